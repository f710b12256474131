"""Train the digits MLP with cosmic under DistributedDataParallel (CPU, gloo), and check what the
ranks agree on.

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
import hashlib

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import cosmic_fx
from cosmic_fx.data import load_digits
from cosmic_fx.models import DigitsMLP


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
    torch.manual_seed(0)  # the same initial weights on every rank (DDP would broadcast rank 0's anyway)
    tm = cosmic_fx.transform(DigitsMLP(), cosmic_fx.CosmicConfig(lower=args.lower))
    ddp = DistributedDataParallel(tm)
    if args.eager:
        cosmic_fx.attach_hooks(tm)
        run = ddp
    else:
        run = cosmic_fx.compile(ddp)
    opt = torch.optim.SGD(tm.parameters(), lr=0.05, momentum=0.9)
    data = load_digits()
    gen = torch.Generator().manual_seed(1234 + rank)  # a different shard on every rank
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(data.y_train), (args.batch,), generator=gen)
        loss = nn.functional.cross_entropy(run(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            if rank == 0:
                print(f"step {step}: loss {mean_loss.item() / world:.4f}, frozen now "
                      f"{cosmic_fx.runtime_of(tm).frozen or 'nothing'}")

    rt = cosmic_fx.runtime_of(tm)
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in tm.parameters())).hexdigest()[:16]
    mine = {"params": digest, "events": rt.freeze_events, "hooked": rt.num_hooked,
            "scaled": sum(1 for v in rt.last_step["scale"].values() if v != 1.0)}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    with torch.no_grad():
        tm.eval()
        error = 100.0 * (tm(data.x_test).argmax(-1) != data.y_test).float().mean().item()
    if rank == 0:
        for r, info in enumerate(everyone):
            print(f"rank {r}: parameters sha256 {info['params']}, {info['hooked']} parameters hooked, "
                  f"{len(info['events'])} freeze event(s), CCE scaled {info['scaled']} gradients in the last step")
        same = all(info["params"] == everyone[0]["params"] and info["events"] == everyone[0]["events"]
                   for info in everyone)
        print(f"identical parameters and freeze events on every rank: {same}")
        print(f"freeze events (step: frozen set): {everyone[0]['events']}")
        print(f"test error: {error:.2f}%")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
