"""Train the digits MLP with cosmic under DistributedDataParallel (CPU, gloo); check what the ranks
agree on, and compare with one process trained on the full batch.

    torchrun --standalone --nproc-per-node 2 examples/ddp_digits.py            # torch.compile(DDP(...))
    torchrun --standalone --nproc-per-node 2 examples/ddp_digits.py --eager    # eager DDP + attach_hooks

The recipe: ``cosmic_fx.transform`` first (it creates the QCI parameters and the model's runtime),
then ``DistributedDataParallel``, then ``cosmic_fx.compile`` (or ``torch.compile(ddp,
backend="cosmic")``). Each rank trains on its own shard of every batch; CDG's decisions are taken
from ``E_out`` of the whole batch and broadcast from rank 0, and DDP's reducer is rebuilt at each
freeze event.
"""

from __future__ import annotations

import argparse
import gc
import hashlib

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import cosmic_fx
from cosmic_fx.data import load_digits
from cosmic_fx.models import DigitsMLP


def shard(data, gens: list[torch.Generator], rank: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randint(0, len(data.y_train), (batch,), generator=gens[rank])
    return data.x_train[idx], data.y_train[idx]


def build(args) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)  # the same initial weights on every rank (DDP would broadcast rank 0's anyway)
    tm = cosmic_fx.transform(DigitsMLP(), cosmic_fx.CosmicConfig(lower=args.lower))
    return tm, torch.optim.SGD(tm.parameters(), lr=0.05, momentum=0.9)


def step(run: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = nn.functional.cross_entropy(run(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32, help="per rank")
    parser.add_argument("--eager", action="store_true", help="eager DDP with attach_hooks instead of torch.compile")
    parser.add_argument("--lower", default="aot_eager", choices=["inductor", "aot_eager", "eager"])
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    data = load_digits()
    tm, opt = build(args)
    ddp = DistributedDataParallel(tm)
    run = ddp if args.eager else cosmic_fx.compile(ddp)
    if args.eager:
        cosmic_fx.attach_hooks(tm)
    gens = [torch.Generator().manual_seed(1234 + r) for r in range(world)]  # a different shard per rank
    losses = []
    for i in range(1, args.steps + 1):
        loss = step(run, opt, *shard(data, gens, rank, args.batch))
        dist.all_reduce(loss)
        losses.append(loss.item() / world)
        if i % 100 == 0 and rank == 0:
            print(f"step {i}: loss {losses[-1]:.4f}, frozen now {cosmic_fx.runtime_of(tm).frozen or 'nothing'}")

    rt = cosmic_fx.runtime_of(tm)
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in tm.parameters())).hexdigest()[:16]
    mine = {"params": digest, "events": rt.freeze_events, "hooked": rt.num_hooked,
            "scaled": sum(1 for v in rt.last_step["scale"].values() if v != 1.0)}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    final = {n: p.detach().clone() for n, p in tm.named_parameters()}
    # release DDP (its reducers hold the process group) while every rank is still here: a gloo group
    # torn down at interpreter exit with work in flight can deadlock
    del run, ddp
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()  # what follows runs in one process, rank 0 alone
    if rank != 0:
        return
    for r, info in enumerate(everyone):
        print(f"rank {r}: parameters sha256 {info['params']}, {info['hooked']} parameters hooked, "
              f"{len(info['events'])} freeze event(s), CCE scaled {info['scaled']} gradients in the last step")
    same = all(info["params"] == everyone[0]["params"] and info["events"] == everyone[0]["events"]
               for info in everyone)
    print(f"identical parameters and freeze events on every rank: {same}")
    print(f"freeze events (step: frozen set): {everyone[0]['events']}")

    # one process, the same steps on the full batch (every rank's shard at once)
    torch._dynamo.reset()
    ref, ref_opt = build(args)
    ref_run = ref if args.eager else cosmic_fx.compile(ref)
    if args.eager:
        cosmic_fx.attach_hooks(ref)
    gens = [torch.Generator().manual_seed(1234 + r) for r in range(world)]
    ref_losses = []
    for _ in range(args.steps):
        xs, ys = zip(*(shard(data, gens, r, args.batch) for r in range(world)))
        ref_losses.append(step(ref_run, ref_opt, torch.cat(xs), torch.cat(ys)).item())
    dloss = max(abs(a - b) for a, b in zip(losses, ref_losses))
    dparam = max((final[n] - p.detach()).abs().max().item() for n, p in ref.named_parameters())
    same_events = cosmic_fx.runtime_of(ref).freeze_events == everyone[0]["events"]
    print(f"one process on the full batch: same freeze events: {same_events}; "
          f"max |loss difference| over {args.steps} steps {dloss:.2e}; max |parameter difference| {dparam:.2e}")
    with torch.no_grad():
        tm.eval()
        error = 100.0 * (tm(data.x_test).argmax(-1) != data.y_test).float().mean().item()
    print(f"test error (DDP run): {error:.2f}%")


if __name__ == "__main__":
    main()
