"""The per-model runtime: ownership, two models in one process, checkpoints, garbage collection,
graph breaks, and bad input."""

import copy
import gc
import math
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import cosmic_fx
from cosmic_fx import CosmicConfig

from . import recipes
from .conftest import mlp_batches, small_mlp
from .test_hooks import hand_efficiency

ROOT = Path(__file__).resolve().parents[1]


def start_fresh_process(*args: str) -> subprocess.Popen:
    """Start ``python -m tests.recipes ARGS`` in a new interpreter (nothing shared with this one); the
    test goes on with its own work meanwhile and calls :func:`finish`."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "tests.recipes", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: int = 900) -> None:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, out[-6000:]


def fresh_process(*args: str) -> None:
    finish(start_fresh_process(*args))


def assert_same_state(a: dict, b: dict) -> None:
    """Bit-identical state dicts (NaN where the other has NaN: readings not taken yet)."""
    assert a.keys() == b.keys()
    for k in a:
        assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True, msg=k)


# ------------------------------------------------------------------ ownership
def test_sequential_sweep_trains_each_model_as_if_alone(tmp_path):
    """Issue 8's repro: two models, one after the other, same config (the default preset). Both train,
    through several CDG decisions, and each ends bit-identical to the same model trained alone in a
    fresh process."""
    steps, engine = 25, "compile"  # two calibrated-CDG decisions (recipes.SCHEDULE), cosmic_fx.compile
    alone = {seed: start_fresh_process("alone", "default", engine, str(seed), str(steps),
                                       str(tmp_path / f"alone{seed}.pt"))
             for seed in (0, 1)}
    results = {}
    for seed in (0, 1):
        tm, run = recipes.prepare(recipes.make_model(seed), recipes.config("default"), engine)
        recipes.train(run, recipes.optimizer(tm), seed, 0, steps)
        rt = cosmic_fx.runtime_of(tm)
        assert rt.steps == steps and len(rt.cdg.events) >= 1  # CDG froze something in each run
        results[seed] = {k: v.detach().clone() for k, v in tm.state_dict().items()}
    for seed in (0, 1):
        finish(alone[seed])
        assert_same_state(results[seed], torch.load(tmp_path / f"alone{seed}.pt", weights_only=True))


def _two_runtimes(engine: str):
    cfg = CosmicConfig(lower="aot_eager", cdg_interval=4, cdg_patience=1, cdg_max_frozen=0.5, efficiency_every=1)
    models = []
    for seed in (0, 1):
        tm, run = recipes.prepare(recipes.make_model(seed), cfg, engine)
        models.append((tm, run, recipes.optimizer(tm)))
    return models


@pytest.mark.parametrize("engine", ["eager", "compile"])
@pytest.mark.parametrize("schedule", ["alternating", "interleaved"])
def test_two_models_in_one_process_never_share_state(engine, schedule):
    """Alternating steps (A, B, A, ...) and interleaved passes (forward A, forward B, backward A,
    backward B) give each model exactly what it gets when trained alone."""
    steps = 12
    alone = []
    for tm, run, opt in _two_runtimes(engine):
        recipes.train(run, opt, 7, 0, steps)
        alone.append(({k: v.clone() for k, v in tm.state_dict().items()}, cosmic_fx.runtime_of(tm).freeze_events))
    torch._dynamo.reset()
    pair = _two_runtimes(engine)
    for step in range(steps):
        x, y = recipes.batch(step, 7)
        if schedule == "alternating":
            for _, run, opt in pair:
                loss = nn.functional.cross_entropy(run(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        else:
            losses = [nn.functional.cross_entropy(run(x), y) for _, run, _ in pair]
            for (_, _, opt), loss in zip(pair, losses):
                opt.zero_grad(set_to_none=True)
                loss.backward()
            for _, _, opt in pair:
                opt.step()
    (ra, rb) = (cosmic_fx.runtime_of(tm) for tm, _, _ in pair)
    assert ra is not rb and ra.steps == rb.steps == steps
    for (tm, _, _), (state, events) in zip(pair, alone):
        assert_same_state({k: v for k, v in tm.state_dict().items()}, state)
        assert cosmic_fx.runtime_of(tm).freeze_events == events
    assert alone[0][1] and alone[0][1] != alone[1][1]  # each froze, and differently: not a shared decision


def test_detach_hooks_touches_only_that_model():
    cfg = CosmicConfig(lower="aot_eager")
    a, b = (cosmic_fx.transform(recipes.make_model(s), cfg) for s in (0, 1))
    ra, rb = cosmic_fx.attach_hooks(a), cosmic_fx.attach_hooks(b)
    assert cosmic_fx.detach_hooks(a) == 1
    assert ra.num_hooked == 0 and cosmic_fx.hooks_of(a) is None
    assert rb.num_hooked == len(list(b.parameters())) and cosmic_fx.hooks_of(b) is rb
    x, y = recipes.batch(0, 0)
    nn.functional.cross_entropy(b(x), y).backward()
    nn.functional.cross_entropy(a(x), y).backward()
    assert rb.steps == 1 and ra.steps == 0


@pytest.mark.parametrize("engine", ["eager", "compile"])
def test_a_garbage_collected_model_frees_its_runtime(engine):
    tm, run = recipes.prepare(recipes.make_model(0), recipes.config("default"), engine)
    recipes.train(run, recipes.optimizer(tm), 0, 0, 3)
    rt = weakref.ref(cosmic_fx.runtime_of(tm))
    params = [weakref.ref(p) for p in tm.parameters()]
    del tm, run
    torch._dynamo.reset()  # dynamo's cache holds the compiled frame, not the runtime
    gc.collect()
    assert rt() is None
    assert all(p() is None for p in params)


def test_plain_model_through_the_entry_point_owns_its_runtime():
    model = small_mlp()
    compiled = torch.compile(model, backend="cosmic", options={"lower": "aot_eager"})
    compiled(torch.randn(4, 6)).sum().backward()
    rt = cosmic_fx.hooks_of(model)
    assert rt is not None and not rt.transformed and rt.num_hooked == 6
    other = small_mlp()
    torch.compile(other, backend="cosmic", options={"lower": "aot_eager"})(torch.randn(4, 6)).sum().backward()
    assert cosmic_fx.hooks_of(other) is not rt
    ref = weakref.ref(rt)
    del rt, compiled, model
    torch._dynamo.reset()
    gc.collect()
    assert ref() is None


# ------------------------------------------------------------------ the rules, step by step
def test_relative_cce_over_several_steps_matches_an_independent_reference():
    """The multiplier of step t uses E(p) of step t and the mean E of the previous measured step
    (the first step: the mean over every parameter), refreshed at every measured step."""
    cfg = CosmicConfig.off(cce="relative", cce_gamma=2.0, cce_min=0.25, cce_max=4.0, efficiency_every=2)
    model = small_mlp()
    ref = copy.deepcopy(model)
    rt = cosmic_fx.attach_hooks(model, cfg)
    opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.2) for m in (model, ref))
    mean, reading = None, {}
    for step, (x, y) in enumerate(mlp_batches(7, scale=3)):
        ref_opt.zero_grad()
        nn.functional.cross_entropy(ref(x), y).backward()
        if step % 2 == 0:  # a measured step
            reading = {n: hand_efficiency(p, 0) for n, p in ref.named_parameters()}
        if mean is None:
            mean = sum(reading.values()) / len(reading)
        scales = {n: min(max(1 + 2.0 * (reading[n] - mean), 0.25), 4.0) for n in reading}
        with torch.no_grad():
            for n, p in ref.named_parameters():
                p.grad.mul_(scales[n])
        ref_opt.step()
        if step % 2 == 0:
            mean = sum(reading.values()) / len(reading)  # refreshed at the end of every measured step
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        for n in scales:
            assert rt.last_step["scale"][n] == pytest.approx(scales[n], rel=1e-5), (step, n)
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"step {step} {n}")
    assert len({round(v, 6) for v in rt.last_step["scale"].values()}) > 1


def test_gradients_are_scaled_exactly_once_after_a_recompile():
    cfg = CosmicConfig.off(cce="seed", lower="aot_eager")
    tm = cosmic_fx.transform(small_mlp(), cfg)
    ref = copy.deepcopy(tm)
    compiled = cosmic_fx.compile(tm)
    for batch in (8, 5, 3):  # new shapes: recompiles, each calling the backend again
        x = torch.randn(batch, 6)
        tm.zero_grad()
        ref.zero_grad()
        compiled(x).pow(2).mean().backward()
        ref(x).pow(2).mean().backward()
        for (n, p), q in zip(tm.named_parameters(), ref.parameters()):
            assert_close(p.grad, q.grad * hand_efficiency(p, 0), rtol=1e-5, atol=1e-7, msg=f"{batch} {n}")
    assert cosmic_fx.runtime_of(tm).num_hooked == len(list(tm.parameters()))


class LSTMHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 24)
        self.lstm = nn.LSTM(24, 24, batch_first=True)
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        h, _ = self.lstm(torch.relu(self.inp(x)))
        return self.head(h[:, -1])


class BreakInTheMiddle(nn.Module):
    """A graph break (a print) between two blocks, and a data-dependent branch: no symbolic trace."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32))
        self.b = nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        h = self.a(x)
        print(end="")  # dynamo cannot trace print: a graph break
        if h.sum() > 0:
            h = h * 2
        return self.b(h)


def _transformer():
    return nn.Transformer(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=24,
                          dropout=0.0, batch_first=True)


@pytest.mark.parametrize("name", ["lstm", "break", "transformer"])
def test_graph_breaks_every_trainable_parameter_is_hooked_and_reported(name):
    torch.manual_seed(0)
    if name == "lstm":
        model, inputs = LSTMHead(), (torch.randn(4, 6, 8),)
    elif name == "transformer":
        model, inputs = _transformer(), (torch.randn(4, 5, 16), torch.randn(4, 3, 16))
    else:
        model, inputs = BreakInTheMiddle(), (torch.randn(4, 8),)
    cfg = CosmicConfig(lower="aot_eager", efficiency_every=1)
    cm = cosmic_fx.compile(model, cfg)
    tm = cm._orig_mod
    with cosmic_fx.inspect.watch_backend(cm) as watch:
        for _ in range(3):
            out = cm(*inputs)
            out.float().pow(2).mean().backward()
    rt = cosmic_fx.hooks_of(tm)
    trainable = [n for n, p in tm.named_parameters() if p.requires_grad]
    assert rt.num_hooked == len(trainable)
    assert set(rt.last_step["scale"]) == set(trainable)  # CCE reached every parameter, eager regions too
    report = watch.report
    # the graph breaks by construction: the LSTM; the print and the data-dependent branch; none
    # (nn.Transformer, rewritten by hooks, compiles whole)
    assert report.graph_breaks == {"lstm": 1, "break": 2, "transformer": 0}[name]
    assert len(report.break_reasons) == report.graph_breaks
    # dynamo does not trace RNNs: the LSTM and the head after it run eagerly; the other model's
    # pieces all compile
    expected = {n for n in trainable if n.startswith(("lstm.", "head."))} if name == "lstm" else set()
    assert set(report.outside_graphs) == expected
    # E_out for CDG: from the graph that returns the output, or (LSTM: no such graph) a forward hook
    assert rt.last_step["e_out"] is not None
    assert (rt._tracker is not None) == (name == "lstm")
    assert f"{report.graph_breaks} graph break(s)" in str(report)


# ------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("engine", ["eager", "compile"])
@pytest.mark.parametrize("preset", ["default", "seed"])
def test_state_dict_round_trip_restores_the_runtime(engine, preset):
    tm, run = recipes.prepare(recipes.make_model(0), recipes.config(preset), engine)
    recipes.train(run, recipes.optimizer(tm), 0, 0, 23)
    state = tm.state_dict()
    assert {"cosmic_state.meta", "cosmic_state.steps", "cosmic_state.cdg.frozen"} <= set(state)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    other = cosmic_fx.transform(recipes.make_model(5), recipes.config(preset))
    other.load_state_dict(state)
    a, b = cosmic_fx.runtime_of(tm), cosmic_fx.runtime_of(other)
    assert_same_state(a.state_dict(), b.state_dict())
    assert b.steps == 23 and b.frozen == a.frozen
    assert [n for n, p in other.named_parameters() if not p.requires_grad] == a.frozen


def test_safetensors_saves_and_loads_a_transformed_model(tmp_path):
    from safetensors.torch import load_file, save_file

    tm, run = recipes.prepare(recipes.make_model(0), recipes.config("default"), "eager")
    recipes.train(run, recipes.optimizer(tm), 0, 0, 23)
    save_file(tm.state_dict(), str(tmp_path / "model.safetensors"))
    other = cosmic_fx.transform(recipes.make_model(3), recipes.config("default"))
    other.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    assert_same_state(other.state_dict(), tm.state_dict())


def test_resume_in_a_fresh_process_is_bit_identical(tmp_path):
    """2N steps in one run == N steps, checkpoint (model + optimizer), rebuild in a fresh process,
    load, N more steps: for the default and seed presets, eager and compiled (aot_eager both runs).
    N = 13 crosses a calibrated-CDG decision on each side and stops between two E(p) measurements
    (recipes.SCHEDULE: a decision every 10 steps, E(p) every 2)."""
    n = 13
    jobs, expected = [], []
    for preset in ("default", "seed"):
        for engine in ("eager", "compile"):
            tm, run = recipes.prepare(recipes.make_model(0), recipes.config(preset), engine)
            opt = recipes.optimizer(tm)
            recipes.train(run, opt, 0, 0, n)
            ckpt = tmp_path / f"{preset}-{engine}.pt"
            torch.save({"model": tm.state_dict(), "optimizer": opt.state_dict()}, ckpt)
            recipes.train(run, opt, 0, n, 2 * n)
            events = cosmic_fx.runtime_of(tm).freeze_events
            if preset == "default":
                assert any(s <= n for s, _ in events) and any(s > n for s, _ in events), events
            expected.append({k: v.detach().clone() for k, v in tm.state_dict().items()})
            jobs += [str(ckpt), preset, engine, "0", str(n), str(2 * n)]
            torch._dynamo.reset()
    out = tmp_path / "resumed.pt"
    fresh_process("resume", *jobs, str(out))
    for want, got in zip(expected, torch.load(out, weights_only=True)):
        assert_same_state(got, want)


# ------------------------------------------------------------------ distributed
def assert_close_state(got: dict, want: dict, msg: str) -> None:
    """Runtime state dicts equal: counters, masks and sets exactly, readings up to float rounding."""
    assert got.keys() == want.keys(), msg
    for k in want:
        if want[k].is_floating_point():
            assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, equal_nan=True, msg=f"{msg} {k}")
        else:
            assert torch.equal(got[k], want[k]), f"{msg} {k}: {got[k]} vs {want[k]}"


def start_ddp(out: Path, steps: int, presets: tuple[str, ...]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "tests.recipes", "ddp", str(steps), *presets, str(out)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_ddp_two_processes_take_identical_decisions_and_keep_identical_parameters(tmp_path):
    """torchrun --nproc-per-node 2 (gloo), on different data per rank: eager DDP,
    cosmic_fx.compile(DDP(tm)) and torch.compile(DDP(tm), backend="cosmic") (with
    find_unused_parameters=True); the default preset deciding every 3 steps, and the fast preset through a
    prefix-CDG freeze event (the reducer rebuilt for the trainable suffix). Every rank hooks every
    parameter, reads E_out from the first step on, takes the same decisions and ends with the same
    parameters (QCIs included) and runtime state (low-reading counters, readings, CCE's mean) as one
    process on the full batch, within float rounding. Run twice in a row (the repeat with the
    default preset), each under a timeout: a collective that one rank skips would hang a run."""
    steps = 12  # calibrated-CDG decisions at steps 3, 6, 9 and 12; prefix CDG freezes at step 7
    presets = ("default", "fast")
    runs = []
    proc = start_ddp(tmp_path / "ddp0", steps, presets)
    # meanwhile, one process on the full batch, the reference for every engine
    reference = {}
    for preset in presets:
        for engine in ("eager", "compile"):
            tm, run = recipes.prepare(recipes.make_model(0), recipes.config(preset, ddp=True), engine)
            opt = recipes.optimizer(tm)
            ref_losses, e_outs = [], []
            for step in range(steps):
                x, y = recipes.full_batch(step, 2)
                loss = nn.functional.cross_entropy(run(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                ref_losses.append(loss.item())
                e_outs.append(cosmic_fx.runtime_of(tm).last_step["e_out"])
            rt = cosmic_fx.runtime_of(tm)
            reference[preset, engine] = {"events": rt.freeze_events, "losses": ref_losses, "e_outs": e_outs,
                                         "params": {n: p.detach().clone() for n, p in tm.named_parameters()},
                                         "state": rt.state_dict()}
            torch._dynamo.reset()
    for repeat in range(2):
        if repeat:  # the repeats: the preset that all-reduces E_out and broadcasts decisions
            proc = start_ddp(tmp_path / f"ddp{repeat}", steps, presets[:1])
        finish(proc, timeout=240)  # a hang fails here, not at the suite's end
        runs.append([torch.load(f"{tmp_path}/ddp{repeat}.rank{r}", weights_only=False) for r in (0, 1)])
    ranks = runs[0]
    for preset, engine in ranks[0]:
        key = (preset, engine)
        a, b = (r[key] for r in ranks)
        assert a["num_hooked"] == b["num_hooked"] == a["n_params"]
        assert a["events"] == b["events"] and len(a["events"]) >= 1 and any(names for _, names in a["events"])
        assert a["scaled"] > 0 and b["scaled"] > 0
        assert any(n.startswith("cosmic_qci.") for n in a["params"])
        for n in a["params"]:
            assert torch.equal(a["params"][n], b["params"][n]), (key, n)
        assert_close_state(b["state"], a["state"], f"{key} rank 1 vs rank 0")
        assert a["uncompiled_steps"] == 0
        # one process on the full batch: the same decisions and state, the same curve up to float rounding
        ref = reference[preset, "eager" if engine == "eager" else "compile"]
        if recipes.config(preset, ddp=True).reads_e_out:  # (prefix CDG and CCE do not read it: not reduced)
            assert None not in a["e_outs"], (key, a["e_outs"])  # E_out of the full batch from the first step
            assert a["e_outs"] == pytest.approx(ref["e_outs"], abs=1e-6), key
        assert a["events"] == ref["events"], key
        assert_close_state(a["state"], ref["state"], f"{key} DDP vs one process")
        # measured (examples/ddp_digits.py, 300 steps): loss 4.8e-7, parameters 3.6e-7
        assert max(abs(p - q) for p, q in zip(a["losses"], ref["losses"])) < 1e-5
        assert ref["params"].keys() == a["params"].keys()
        for n, p in ref["params"].items():
            assert_close(a["params"][n], p, rtol=1e-5, atol=2e-6, msg=f"{key} {n}")
        # the repeats end where the first run did
        for other in runs[1:] if preset == presets[0] else ():
            for n in a["params"]:
                assert torch.equal(other[0][key]["params"][n], a["params"][n]), (key, n)
    if ranks[0]["default", "eager"]["events"] == []:
        pytest.fail("the default preset must reach a freeze event within the schedule")
    # prefix CDG froze the first block (and its QCI) for good, on both ranks and every engine: the drift
    # signal (window 3) snapshots the block at step 0 and reads it at the ends of steps 3 and 6, so the
    # event is at step 7
    for engine in recipes.DDP_ENGINES:
        (step, names), = ranks[0]["fast", engine]["events"]
        assert step == 7 and set(names) == {"0.weight", "0.bias", *(n for n in ranks[0]["fast", engine]["params"]
                                                                   if n.startswith("cosmic_qci.0."))}


# ------------------------------------------------------------------ bad input
def test_loading_state_saved_with_another_config_names_the_difference():
    tm = cosmic_fx.transform(recipes.make_model(0), CosmicConfig(cdg_interval=20))
    other = cosmic_fx.transform(recipes.make_model(0), CosmicConfig())
    with pytest.raises(RuntimeError, match=r"another CosmicConfig: cdg_interval=20 in the checkpoint vs 50 here"):
        other.load_state_dict(tm.state_dict())
    # the lowering is not part of the state: a run may resume under another backend
    other_lowering = cosmic_fx.transform(recipes.make_model(0), CosmicConfig(cdg_interval=20, lower="eager"))
    other_lowering.load_state_dict(tm.state_dict())


def test_loading_state_of_other_sites_names_the_parameters():
    tm = cosmic_fx.transform(recipes.make_model(0), CosmicConfig())  # sites 0, 2 (rewritten), 4
    other = cosmic_fx.transform(nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10)), CosmicConfig())
    with pytest.raises(RuntimeError, match=r"covers other parameters than this model \(missing in the checkpoint: "
                                           r"\[\]; not in this model: \['4.weight', '4.bias', 'cosmic_qci.2.beta'"):
        other.load_state_dict(tm.state_dict(), strict=False)


def test_loading_state_of_a_newer_format_asks_for_an_upgrade():
    import json

    tm = cosmic_fx.transform(recipes.make_model(0), CosmicConfig())
    state = tm.state_dict()
    meta = json.loads(bytes(state["cosmic_state.meta"].tolist()))
    meta["format_version"] = 99
    state["cosmic_state.meta"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="format version 99 .* Upgrade cosmic_fx"):
        tm.load_state_dict(state)


def test_missing_and_unexpected_cosmic_keys_follow_strict_semantics():
    tm = cosmic_fx.transform(recipes.make_model(0), CosmicConfig())
    state = tm.state_dict()
    del state["cosmic_state.cdg.frozen"]
    state["cosmic_state.bogus"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "cosmic_state.cdg.frozen"'):
        tm.load_state_dict(state)
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "cosmic_state.bogus"'):
        tm.load_state_dict(state)
    result = tm.load_state_dict(state, strict=False)
    assert result.missing_keys == ["cosmic_state.cdg.frozen"] and result.unexpected_keys == ["cosmic_state.bogus"]
    plain = {k: v for k, v in state.items() if not k.startswith("cosmic_state.")}
    result = tm.load_state_dict(plain, strict=False)  # a checkpoint of the base model: fresh CDG/CCE state
    assert "cosmic_state.steps" in result.missing_keys
    with pytest.raises(RuntimeError, match="missing keys"):
        cosmic_fx.runtime_of(tm).load_state_dict({"steps": torch.tensor(3)})


def test_attach_hooks_refuses_a_model_trained_by_another_runtime():
    base = recipes.make_model(0)
    a, b = cosmic_fx.transform(base, CosmicConfig()), cosmic_fx.transform(base, CosmicConfig())  # share base weights
    cosmic_fx.attach_hooks(a)
    with pytest.raises(RuntimeError, match="already trained by another active cosmic runtime"):
        cosmic_fx.attach_hooks(b)
    cosmic_fx.detach_hooks(a)
    cosmic_fx.attach_hooks(b)
    with pytest.raises(ValueError,
                       match=r"transformed with another CosmicConfig \(.*cdg: 'calibrated' \(transform\) vs 'seed'"):
        cosmic_fx.attach_hooks(b, CosmicConfig.seed())


def test_a_model_wrapped_in_ddp_before_transform_is_refused(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(recipes.make_model(0))
        for call in (cosmic_fx.transform, cosmic_fx.compile, cosmic_fx.attach_hooks):
            with pytest.raises(TypeError, match=r"wrapped in DistributedDataParallel. Transform first, then wrap"):
                call(ddp)
    finally:
        dist.destroy_process_group()


def test_fsdp2_sharded_parameters_refuse_cdg_and_cce(tmp_path):
    """FSDP2 shards dim 0, the dimension E(p)'s softmax runs over: CDG/CCE on shards would decide from
    the wrong numbers, so they are refused with a clear error (README: Checkpoints and distributed
    training)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        with pytest.raises(TypeError, match="wrapped in FSDP. Transform first, then wrap"):
            cosmic_fx.transform(fully_shard(recipes.make_model(0)))
        for call in (cosmic_fx.attach_hooks, cosmic_fx.compile):
            tm = fully_shard(cosmic_fx.transform(recipes.make_model(0), CosmicConfig(qci=False, lower="aot_eager")))
            with pytest.raises(TypeError, match=r"parameters are sharded \(FSDP2 fully_shard / DTensor\)"):
                call(tm)
    finally:
        dist.destroy_process_group()


def test_a_runtime_used_after_its_model_was_freed_says_so():
    tm = cosmic_fx.transform(recipes.make_model(0), CosmicConfig())
    rt = cosmic_fx.runtime_of(tm)
    del tm
    gc.collect()
    with pytest.raises(RuntimeError, match="the model this runtime belonged to was garbage-collected"):
        rt.state_dict()


def test_non_finite_readings_warn_once_and_decide_nothing():
    """A NaN parameter makes its E(p) and (through the output) E_out NaN: one warning, no scaling by
    the NaN reading, no low-reading count, no freezing decision."""
    cfg = CosmicConfig.off(cdg="calibrated", cce="relative", cdg_patience=1, cdg_interval=2, efficiency_every=1)
    model = small_mlp()
    with torch.no_grad():
        model[0].bias[0] = float("nan")
    rt = cosmic_fx.attach_hooks(model, cfg)
    x, y = mlp_batches(1, scale=3)[0]
    with pytest.warns(RuntimeWarning, match=r"non-finite efficiency reading at step 0: E\(.*\) = nan") as record:
        for _ in range(4):
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            assert rt.last_step["scale"]["0.bias"] == 1.0  # its own reading is NaN: no scaling from it
            assert math.isnan(rt.last_step["e_out"])
    assert sum("non-finite" in str(w.message) for w in record) == 1
    assert rt.cdg.low_count == [0] * 6 and rt.frozen == [] and rt.cdg.events == []
