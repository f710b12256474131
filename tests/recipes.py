"""Training recipes shared by the runtime tests and the fresh processes they start.

Run as ``python -m tests.recipes MODE ARGS...`` from the repository root (the tests do this) to train
in a process that never saw the test's models: ``alone`` trains one model and saves its parameters;
``resume`` loads checkpoints written by the test process, continues them and saves the results.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

import cosmic_fx
from cosmic_fx import CosmicConfig

# The suite checks behaviour, never speed; one thread also makes reductions run in one order.
torch.set_num_threads(1)

PRESETS = {"default": CosmicConfig, "seed": CosmicConfig.seed, "fast": CosmicConfig.fast}


# The default preset's mechanisms on a shorter schedule (E(p) every 2 steps and a calibrated-CDG decision
# every 10, instead of 10 and 50), so that a few dozen steps cross several decisions. The seed preset
# measures every step already.
SCHEDULE = {"default": {"cdg_interval": 10, "efficiency_every": 2}, "seed": {},
            # prefix CDG (the preset's drift signal) deciding after 2 windows of 3 steps, any change counting
            # as settled, a QCI on every site: block "0" of the 3-layer MLP freezes at step 7 (one block of
            # the two: cap 0.75); CCE on (the
            # preset has it off), so that prefix CDG is tested together with CCE's multipliers and state
            "fast": {"cdg_prefix_window": 3, "cdg_prefix_threshold": 1e9, "cdg_prefix_max": 0.75, "qci": True,
                     "qci_min_width": 0, "cce": "relative"}}


# DDP runs decide every 3 steps (calibrated CDG counts every reading: a counter one step behind on one
# side shows in the next decision)
DDP_SCHEDULE = {"default": {"cdg_interval": 3, "efficiency_every": 1}, "fast": SCHEDULE["fast"]}
DDP_ENGINES = ("eager", "compile", "torch.compile")


def config(preset: str, ddp: bool = False) -> CosmicConfig:
    return PRESETS[preset](lower="aot_eager", **(DDP_SCHEDULE if ddp else SCHEDULE)[preset])


def make_model(seed: int) -> nn.Module:
    from cosmic_fx.models import DigitsMLP

    torch.manual_seed(seed)
    return DigitsMLP(hidden=48)


def batch(step: int, seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``step`` of a fixed sequence of digits batches (the same in every process)."""
    from cosmic_fx.data import load_digits

    data = _DATA.setdefault("digits", load_digits())
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    idx = torch.randint(0, len(data.y_train), (size,), generator=g)
    return data.x_train[idx], data.y_train[idx]


_DATA: dict = {}


def prepare(model: nn.Module, cfg: CosmicConfig, engine: str) -> tuple[nn.Module, nn.Module]:
    """``(transformed model, what to call)`` for ``engine`` ``"eager"`` (transform + attach_hooks) or
    ``"compile"`` (``cosmic_fx.compile`` of the transformed model)."""
    tm = cosmic_fx.transform(model, cfg)
    if engine == "eager":
        cosmic_fx.attach_hooks(tm)
        return tm, tm
    return tm, cosmic_fx.compile(tm)


def optimizer(tm: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(tm.parameters(), lr=0.05, momentum=0.9)


def train(run: nn.Module, opt: torch.optim.Optimizer, seed: int, start: int, stop: int) -> list[float]:
    losses = []
    for step in range(start, stop):
        x, y = batch(step, seed)
        loss = nn.functional.cross_entropy(run(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def train_alone(preset: str, engine: str, seed: int, steps: int) -> dict[str, torch.Tensor]:
    tm, run = prepare(make_model(seed), config(preset), engine)
    train(run, optimizer(tm), seed, 0, steps)
    return {k: v.detach().clone() for k, v in tm.state_dict().items()}


def resume(checkpoint: str, preset: str, engine: str, seed: int, start: int, stop: int) -> dict[str, torch.Tensor]:
    saved = torch.load(checkpoint, weights_only=True)
    tm, run = prepare(make_model(seed + 1000), config(preset), engine)  # other init: all state comes from the file
    tm.load_state_dict(saved["model"])
    opt = optimizer(tm)
    opt.load_state_dict(saved["optimizer"])
    train(run, opt, seed, start, stop)
    return {k: v.detach().clone() for k, v in tm.state_dict().items()}


def full_batch(step: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch one process sees when it trains on every rank's shard at once."""
    xs, ys = zip(*(shard(step, r) for r in range(world)))
    return torch.cat(xs), torch.cat(ys)


def shard(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s part of step ``step``: different digits on every rank."""
    return batch(step, 11 + rank, size=16)


def train_ddp(engine: str, steps: int, preset: str = "default") -> dict:
    """One rank of a DistributedDataParallel run: returns what the test compares. ``engine``: eager DDP
    with ``attach_hooks``, ``cosmic_fx.compile(DDP(tm))``, or ``torch.compile(DDP(tm), backend="cosmic")``
    with ``find_unused_parameters=True`` (each rank's own shard: its per-rank state differs most)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    rank = dist.get_rank()
    torch._dynamo.reset()
    tm = cosmic_fx.transform(make_model(0), config(preset, ddp=True))  # transform first, then wrap
    ddp = DistributedDataParallel(tm, find_unused_parameters=engine == "torch.compile")
    if engine == "eager":
        cosmic_fx.attach_hooks(tm)
        run = ddp
    elif engine == "compile":
        run = cosmic_fx.compile(ddp)
    else:
        run = torch.compile(ddp, backend="cosmic")
    opt = optimizer(tm)
    losses, scaled, e_outs = [], 0, []
    for step in range(steps):
        x, y = shard(step, rank)
        loss = nn.functional.cross_entropy(run(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        losses.append(mean_loss.item() / dist.get_world_size())
        rt = cosmic_fx.runtime_of(tm)
        scaled += sum(1 for v in rt.last_step["scale"].values() if v != 1.0)
        e_outs.append(rt.last_step["e_out"])
    return {"params": {n: p.detach().clone() for n, p in tm.named_parameters()}, "losses": losses,
            "events": rt.freeze_events, "num_hooked": rt.num_hooked, "n_params": len(rt.names),
            "scaled": scaled, "uncompiled_steps": rt.uncompiled_steps, "e_outs": e_outs,
            "state": {k: v.clone() for k, v in rt.state_dict().items()}}


def main(argv: list[str]) -> None:
    mode, out = argv[0], argv[-1]
    if mode == "alone":
        preset, engine, seed, steps = argv[1], argv[2], int(argv[3]), int(argv[4])
        torch.save(train_alone(preset, engine, seed, steps), out)
    elif mode == "resume":
        # checkpoint preset engine seed start stop, repeated; one output file for all of them
        jobs = [argv[i : i + 6] for i in range(1, len(argv) - 1, 6)]
        torch.save([resume(c, p, e, int(s), int(a), int(b)) for c, p, e, s, a, b in jobs], out)
    elif mode == "ddp":
        # run by torchrun: every rank trains eagerly, then compiled, and saves what it saw
        import torch.distributed as dist

        dist.init_process_group("gloo")
        steps, presets = int(argv[1]), argv[2:-1] or ["default"]
        result = {(preset, engine): train_ddp(engine, steps, preset)
                  for preset in presets for engine in DDP_ENGINES}
        torch.save(result, f"{out}.rank{dist.get_rank()}")
        dist.destroy_process_group()
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
