"""The peers of ``cosmic-fx bench claims`` (issue 17, item 5): each arm trains, does what it says, and
lands in the targets table; a missing optional package skips its arm with one line."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys

import pytest
import torch
from torch import nn

from cosmic_fx import CosmicConfig
from cosmic_fx.bench import peers
from cosmic_fx.bench.arms import PEERS, arm_names, arms_for, peer_arms
from cosmic_fx.bench.claims_train import Run, train_run
from cosmic_fx.bench.tasks import Task, _classification_batches, _error_of, make_tasks
from cosmic_fx.bench.verdicts import PEER_TARGETS, targets_table
from cosmic_fx.bench.workloads import MnistCNN
from cosmic_fx.models import TinyTransformerLM
from cosmic_fx.training import Arm

NAN = float("nan")


@pytest.fixture(scope="module")
def transfer():
    """The quick mnist-transfer task (pretrained once, in memory)."""
    return make_tasks(["mnist-transfer"], quick=True)[0]


def _recording(task: Task):
    """The task, with its model kept and each loss call's requires_grad flags and conv1 weight recorded."""
    seen: dict = {"model": None, "calls": []}

    def factory(seed):
        seen["model"] = task.factory(seed)
        return seen["model"]

    def loss(out, y):
        model = seen["model"]
        seen["calls"].append(({n: p.requires_grad for n, p in model.named_parameters()},
                              model.conv1.weight.detach().clone()))
        return task.loss(out, y)

    return dataclasses.replace(task, factory=factory, loss=loss), seen


# --------------------------------------------------------------------------- the arm list
def test_peers_join_fine_tuning_tasks_only(transfer):
    digits = make_tasks(["digits-mlp"], quick=True)[0]
    assert not any(name in PEERS for name in arms_for(digits, "eager", quick=True))
    names = list(arms_for(transfer, "eager", quick=True))
    assert names[-len(PEERS):] == list(PEERS)
    assert set(PEERS) <= set(arm_names())
    best = peer_arms(transfer, "eager")["torch.compile, best optimizer"]
    assert best.optimizer == "momentum" and best.impl == peers.BEST_IMPL["momentum"]  # the task's optimizer
    assert list(arms_for(transfer, "eager", quick=True, only=["FreezeOut schedule"])) == [
        "eager SGD+momentum", "torch.compile", "FreezeOut schedule"]


def test_unknown_optimizer_implementation_is_refused():
    from cosmic_fx.training import _optimizer

    with pytest.raises(ValueError, match="unknown optimizer implementation 'fastest'"):
        _optimizer(Arm("x", optimizer="adamw", impl="fastest"), nn.Linear(2, 2).parameters())


@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_best_optimizer_arm_trains_like_the_default_implementation(transfer, impl):
    """Same math as the default loop: the same metric curve up to float rounding."""
    base = train_run(transfer, Arm("tc", None, "compile", "momentum", transfer.lr, lower="eager"), seed=0)
    other = train_run(transfer, Arm("tc", None, "compile", "momentum", transfer.lr, lower="eager", impl=impl), seed=0)
    assert len(other.curve) == len(base.curve) and other.gradient_check == "match"
    assert all(abs(a[1] - b[1]) <= 1.0 for a, b in zip(base.curve, other.curve))  # 1 point: one or two images


# --------------------------------------------------------------------------- FreezeOut
def test_freeze_units_are_prefix_cdgs_blocks():
    assert peers.freeze_units(MnistCNN(), torch.zeros(1, 1, 28, 28)) == [
        ["conv1.weight", "conv1.bias"], ["conv2.weight", "conv2.bias"], ["conv3.weight", "conv3.bias"],
        ["fc.weight", "fc.bias"]]  # the head (output layer) is never a block
    lm = TinyTransformerLM(20, dim=16, heads=2, layers=6, context=8)
    units = peers.freeze_units(lm, torch.zeros(1, 8, dtype=torch.long))
    assert len(units) == 6 and units[0][:2] == ["tok.weight", "pos"]  # the embeddings join the first block
    assert not any(n.startswith(("head.", "ln.")) for u in units for n in u)
    assert peers.freezeout_count(units) == 2 and peers.freezeout_count([]) == 0


def test_a_fixed_freeze_schedule_freezes_its_k_blocks_from_its_step(transfer):
    task, seen = _recording(transfer)
    run = train_run(task, Arm("freezeout:2@0", None, "compile", "momentum", task.lr, lower="eager",
                              peer="freezeout:2@0"), seed=0)
    calls = seen["calls"][2:2 + task.steps]
    first = {"conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"}
    assert all({n for n, g in flags.items() if not g} == first for flags, _ in calls)
    assert torch.equal(calls[0][1], seen["model"].conv1.weight.detach())  # never trained
    assert "2 of 4 blocks frozen from step 0" in run.note


@pytest.mark.parametrize("spec", ["freezeout:", "freezeout:2", "freezeout:x@0", "freeze:1@0", "freezeout:0@0",
                                  "freezeout:5@0", "freezeout:1@300"])
def test_a_bad_freeze_schedule_is_refused_with_the_valid_form(spec):
    units = [["a.w"], ["b.w"], ["c.w"], ["d.w"]]
    with pytest.raises(ValueError, match="freezeout:K@S|K must be 1..4"):
        peers.freeze_schedule(spec, units, 300)


def test_freezeout_freezes_exactly_the_first_third_from_30_percent(transfer):
    task, seen = _recording(transfer)
    run = train_run(task, Arm("FreezeOut schedule", None, "compile", "momentum", task.lr, lower="eager",
                              peer="freezeout"), seed=0)
    calls = seen["calls"][2:2 + task.steps]  # the first two: the gradient check (eager, compiled); the last: memory
    start = peers.freezeout_step(task.steps)  # 6 of 20: steps 0..5 train everything
    assert start == 6
    first = {"conv1.weight", "conv1.bias"}  # 4 blocks (conv1-3, fc): the first third is conv1
    for i, (flags, _) in enumerate(calls):
        frozen = {n for n, g in flags.items() if not g}
        assert frozen == (first if i >= start else set()), i
    w_at_freeze, w_end = calls[start][1], seen["model"].conv1.weight.detach()
    assert torch.equal(w_at_freeze, w_end)  # frozen: no update after the step it froze
    assert not torch.equal(calls[0][1], w_at_freeze)  # it trained before
    assert seen["model"].conv2.weight.requires_grad and seen["model"].head.weight.requires_grad
    assert "1 of 4 blocks frozen from step 6" in run.note
    assert run.frozen_fraction == pytest.approx(2 / 10 * (task.steps - start) / task.steps)


# --------------------------------------------------------------------------- LoRA
needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft not installed (extra: peers)")


@needs_peft
def test_lora_model_trains_only_the_adapters_and_the_head():
    lm = peers.lora_model(TinyTransformerLM(20, dim=16, heads=2, layers=2, context=8))
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert {n for n in trainable if "lora_" not in n} == {"head.weight", "head.bias"}
    wrapped = {n.split(".lora_")[0] for n in trainable if "lora_" in n}
    assert wrapped == {f"blocks.{b}.{m}" for b in range(2) for m in ("qkv", "proj", "fc1", "fc2")}
    a = lm.get_submodule("blocks.0.qkv").lora_A["default"].weight
    assert a.shape[0] == peers.LORA_RANK


@needs_peft
def test_lora_arm_updates_only_the_adapters_and_the_head(transfer):
    task, seen = _recording(transfer)
    run = train_run(task, Arm("peft LoRA r=8", None, "compile", "momentum", task.lr, lower="eager", peer="lora"),
                    seed=0)
    model = seen["model"]
    start = transfer.factory(0)  # the same pretrained weights; the head is seeded by train_run's manual_seed
    assert torch.equal(model.conv1.weight, start.conv1.weight)
    assert torch.equal(model.fc.base_layer.weight, start.fc.weight)  # the base of the LoRA layer: frozen
    assert model.fc.lora_B["default"].weight.abs().sum() > 0  # B starts at zero: it trained
    assert math.isfinite(run.final) and run.gradient_check == "match"
    assert "LoRA r=8" in run.note


def test_missing_peft_skips_the_lora_arm_with_one_line(transfer, monkeypatch, capsys):
    from cosmic_fx.bench import claims

    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    with pytest.raises(peers.PeerSkipped, match="peft is not installed"):
        peers.lora_model(MnistCNN())
    monkeypatch.setattr(claims, "make_tasks", lambda names, quick, cache_dir=None: [transfer])
    out = claims.run(["mnist-transfer"], seeds=1, quick=True, show_progress=False, arms=["peft LoRA r=8"])
    err = capsys.readouterr().err
    assert err.count("peft LoRA arm skipped: peft is not installed") == 1
    assert "peft LoRA r=8" not in out["arms"] and "### Arms not run" in out["markdown"]
    assert "peft is not installed" in out["payload"]["skipped"]["mnist-transfer"]["peft LoRA r=8"]


# --------------------------------------------------------------------------- the cache arm
def _repeating_task() -> Task:
    """64 MNIST-sized images, batches of 16 for 40 steps: every sample comes back 10 times. The label is
    which of 5 horizontal bands is lit (learnable: the error falls)."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (64,), generator=gen)
    x = 0.5 * torch.rand(64, 1, 28, 28, generator=gen)
    for i, c in enumerate(y.tolist()):
        x[i, 0, 5 * c:5 * c + 5] += 0.5
    return Task(name="repeat", factory=lambda seed: MnistCNN(), batches=_classification_batches(x, y, 16, 40),
                loss=nn.functional.cross_entropy, evaluate=_error_of(x, y), metric="error %", target=50.0,
                steps=40, eval_every=10, optimizer="momentum", lr=0.05, adamw_lr=1e-3, tolerance=1.0,
                tags=frozenset({"fine-tune"}))


def test_cache_arm_equals_the_fast_arm_and_hits_the_cache():
    task = _repeating_task()
    # freeze as soon as a decision is possible, so that the cache serves most of the run
    cfg = CosmicConfig.fast(lower="eager", cdg_prefix_window=2, cdg_prefix_threshold=1e9)
    models = []

    def factory(seed):
        models.append(MnistCNN())
        return models[-1]

    task = dataclasses.replace(task, factory=factory)
    fast = train_run(task, Arm("cosmic fast", cfg, "compile", "momentum", task.lr), seed=0)
    cached = train_run(task, Arm("cosmic fast + cache", cfg, "compile", "momentum", task.lr, peer="cache"), seed=0)
    hits = float(cached.note.split("cache hits ")[1].split("%")[0])
    assert hits > 50, cached.note
    assert fast.frozen_fraction > 0 and cached.frozen_fraction == pytest.approx(fast.frozen_fraction)
    assert fast.curve[-1][1] < fast.curve[0][1]  # it learns: the comparison is not of two stuck runs
    # each cached entry was computed in another batch: equal up to batch-dependent float rounding
    assert [s for s, _ in cached.curve] == [s for s, _ in fast.curve]
    assert all(abs(a - b) <= 100 / 64 + 1e-6 for (_, a), (_, b) in zip(cached.curve, fast.curve))
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-5), name  # the same training, weight by weight


def test_cache_arm_is_not_applicable_when_inputs_do_not_repeat(transfer):
    arm = peer_arms(transfer, "eager")["cosmic fast + cache"]
    with pytest.raises(peers.PeerSkipped, match=r"not applicable: inputs do not repeat \(0\.0% of the samples"):
        train_run(transfer, arm, seed=0)  # quick: 20 batches of 8 out of 2,000 images


def test_repeat_fraction_counts_samples_seen_before():
    task = _repeating_task()
    assert peers.repeat_fraction(task.batches(0)) == pytest.approx(1 - 64 / 640)


# --------------------------------------------------------------------------- the targets table
def _runs(time_to: list[float]) -> list[Run]:
    return [Run(final=1.0, curve=[(10, 1.0)], steps_to_target=5.0, time_to_target=t, median_step=0.01,
                compile_time=0.0, peak_memory_mb=10.0, frozen_fraction=0.0, scaled_fraction=0.0) for t in time_to]


def test_peer_targets_in_the_targets_table():
    task = Task(name="ft", factory=None, batches=None, loss=None, evaluate=None, metric="error %", target=3.0,
                steps=10, eval_every=5, optimizer="momentum", lr=0.01, adamw_lr=1e-3, tolerance=1.0,
                tags=frozenset({"fine-tune"}))
    results = {"ft": {"torch.compile": _runs([10.0, 10.1, 9.9]), "eager SGD+momentum": _runs([10.0, 10.1, 9.9]),
                      "cosmic fast": _runs([8.0, 8.1, 7.9]), "peft LoRA r=8": _runs([7.0, 7.1, 6.9]),
                      "cosmic fast + cache": _runs([4.0, 4.1, 3.9])}}
    _, payload = targets_table([task], results)
    got = {p["target"]: p["verdict"] for p in payload if p["target"] in {t.text for t in PEER_TARGETS}}
    lora, cache = PEER_TARGETS
    assert got == {lora.text: "fails", cache.text: "holds"}  # later than LoRA; 0.4x torch.compile
    del results["ft"]["cosmic fast + cache"]
    md, payload = targets_table([task], results, {"ft": {"cosmic fast + cache": "not applicable: inputs do not "
                                                                                 "repeat (0.0% ...)"}})
    assert any(p["target"] == cache.text and p["verdict"].startswith("not run: not applicable") for p in payload)
    assert "not run: not applicable" in md
