"""Train a small GPT-2 with the Hugging Face Trainer, with and without cosmic, and print the comparison.

    python examples/hf_trainer.py            # 200 steps per arm, each in its own process (28 min on 2 busy cores)
    python examples/hf_trainer.py --quick    # plain and cosmic, a few steps, in this process (the tests run it)

Offline: the model is built from a ``GPT2Config`` (no download) and reads the Python standard library's
own source, byte by byte (vocabulary 256: no tokenizer). The arms:

* ``plain``: the model as it is, eager PyTorch;
* ``compile``: the same through ``TrainingArguments(torch_compile=True)`` with the lowering of
  the cosmic arm (what compiling alone costs and gives);
* ``cosmic``: ``cosmic_fx.compile(model, CosmicConfig())`` handed to the same stock Trainer, with
  ``CosmicCallback`` logging what CDG/CCE did and checkpoints written at half-time;
* ``resumed``: a fresh process rebuilds the model, resumes from that checkpoint
  (``trainer.train(resume_from_checkpoint=...)``) and its final parameters are compared with the
  uninterrupted cosmic arm's.

``TrainingArguments(torch_compile_backend="cosmic")`` is not an arm: accelerate rejects the name
(``ValueError: 'COSMIC' is not a valid DynamoBackend``), and a backend could not add the QCI parameters anyway.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

# arm -> its label in the table
ARMS = {"plain": "plain (eager)", "compile": "torch.compile", "cosmic": "cosmic_fx.compile",
        "resumed": "cosmic_fx.compile, resumed"}


# ---------------------------------------------------------------------- data and model
def stdlib_bytes(limit: int) -> bytes:
    """The first ``limit`` bytes of the standard library's top-level ``.py`` files, in name order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = bytearray()
    for path in sorted(root.glob("*.py")):
        out += path.read_bytes()
        if len(out) >= limit:
            break
    if len(out) < limit:
        raise RuntimeError(f"only {len(out)} bytes of Python source under {root}; pass a smaller --bytes")
    return bytes(out[:limit])


class Blocks(torch.utils.data.Dataset):
    """Consecutive blocks of ``block`` bytes as ``input_ids`` / ``labels`` (the model shifts them)."""

    def __init__(self, data: bytes, block: int) -> None:
        ids = torch.tensor(list(data), dtype=torch.long)
        self.x = ids[: len(ids) // block * block].view(-1, block)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i]}


def datasets(opts) -> tuple[Blocks, Blocks]:
    blocks = Blocks(stdlib_bytes(opts.bytes), opts.block)
    n_eval = max(len(blocks) // 10, 1)
    train, held = Blocks(b"", opts.block), Blocks(b"", opts.block)
    train.x, held.x = blocks.x[:-n_eval], blocks.x[-n_eval:]
    return train, held


def build_model(opts):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=256, n_positions=opts.block, n_embd=opts.width, n_layer=opts.layers,
                     n_head=opts.heads, bos_token_id=0, eos_token_id=0, use_cache=False)
    return GPT2LMHeadModel(cfg)


# ---------------------------------------------------------------------- one arm
def training_args(opts, out: Path, arm: str):
    from transformers import TrainingArguments

    extra = {}
    if arm == "compile":
        extra = {"torch_compile": True, "torch_compile_backend": opts.lower}
    return TrainingArguments(
        output_dir=str(out), max_steps=opts.steps, per_device_train_batch_size=opts.batch,
        per_device_eval_batch_size=opts.batch, learning_rate=opts.lr, warmup_steps=opts.steps // 10,
        logging_steps=max(opts.steps // 10, 1), save_steps=opts.steps // 2, save_strategy="steps",
        report_to="none", disable_tqdm=True, seed=0, use_cpu=True, **extra)


def run_arm(opts, arm: str, workdir: Path) -> dict:
    """Train one arm; returns its row (losses, times, peak memory) and, for cosmic, what it did."""
    from transformers import PrinterCallback, Trainer, TrainerCallback

    import cosmic_fx
    from cosmic_fx.integrations.hf import CosmicCallback

    torch.set_num_threads(opts.threads)

    class FirstStep(TrainerCallback):
        """Times the first step (compilation happens there) apart from the rest."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.begin, self.first = time.perf_counter(), None

        def on_step_end(self, args, state, control, **kwargs):
            if self.first is None:
                self.first = time.perf_counter() - self.begin

    train, held = datasets(opts)
    model = build_model(opts)
    callbacks = [FirstStep()]
    cosmic = arm in ("cosmic", "resumed")
    if cosmic:
        model = cosmic_fx.compile(model, cosmic_fx.CosmicConfig(lower=opts.lower))
        callbacks.append(CosmicCallback())
    out = workdir / arm
    trainer = Trainer(model=model, args=training_args(opts, out, arm), train_dataset=train, eval_dataset=held,
                      callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # the table says it all
    resume = str(workdir / "cosmic" / f"checkpoint-{opts.steps // 2}") if arm == "resumed" else None
    result = trainer.train(resume_from_checkpoint=resume)
    metrics = trainer.evaluate()
    train_logs = [e for e in trainer.state.log_history if "loss" in e]
    row = {
        "arm": ARMS[arm],
        "train loss (last log)": train_logs[-1]["loss"],
        "eval loss": metrics["eval_loss"],
        "eval bits/byte": metrics["eval_loss"] / math.log(2),
        "train time (s)": result.metrics["train_runtime"],
        "first step (s)": callbacks[0].first,
        "steps run": trainer.state.global_step - (opts.steps // 2 if resume else 0),
        "peak RSS (MiB)": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if opts.own_process else None,
    }
    if cosmic:
        last = callbacks[1].history[-1]
        row["cosmic"] = {k: v for k, v in last.items() if k != "step"}
        final = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save(final, workdir / ("final-resumed.pt" if resume else "final.pt"))
    return row


# ---------------------------------------------------------------------- driver
def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a tiny model, a few steps, every arm in this process")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lower", default=None, choices=["inductor", "aot_eager", "eager"],
                   help="lowering of the compiled arms (default aot_eager; eager with --quick)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--arms", default=None,
                   help=f"comma-separated subset of: {', '.join(ARMS)} (default: all; plain,cosmic with --quick)")
    p.add_argument("--workdir", default=None, help="where checkpoints go (default: a temporary directory)")
    p.add_argument("--arm", default=None, help=argparse.SUPPRESS)  # internal: run one arm, print its row
    opts = p.parse_args(argv)
    quick = opts.quick
    opts.steps = opts.steps or (8 if quick else 200)
    opts.lower = opts.lower or ("eager" if quick else "aot_eager")
    # sizes where the held-out tenth fills whole eval batches: a last, smaller batch would recompile
    opts.bytes = 15_360 if quick else 200_000
    opts.block = 32 if quick else 64
    opts.width, opts.layers, opts.heads = (32, 1, 2) if quick else (64, 2, 4)
    opts.batch = 4 if quick else opts.batch
    opts.own_process = not quick
    arms = [a.strip() for a in (opts.arms or ("plain,cosmic" if quick else ",".join(ARMS))).split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        p.error(f"unknown arm(s) {unknown}; choose from: {', '.join(ARMS)}")
    if "resumed" in arms and "cosmic" not in arms:
        p.error("the 'resumed' arm resumes the 'cosmic' arm's checkpoint: list 'cosmic' too")
    if opts.steps < 2:
        p.error("--steps must be >= 2 (the resumed arm starts at half-time)")
    opts.arm_list = arms
    return opts


def arm_in_process(opts, arm: str, workdir: Path) -> dict:
    """Run ``arm`` in a fresh Python process (its own peak memory and no compiled code shared)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--arm", arm, "--workdir", str(workdir),
           "--steps", str(opts.steps), "--batch", str(opts.batch), "--lr", str(opts.lr), "--lower", opts.lower,
           "--threads", str(opts.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"arm {arm!r} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def report(rows: list[dict], workdir: Path, opts) -> str:
    from tabulate import tabulate

    cols = ["arm", "train loss (last log)", "eval loss", "eval bits/byte", "train time (s)", "first step (s)",
            "steps run", "peak RSS (MiB)"]
    lines = [f"GPT-2 ({opts.layers} layers, width {opts.width}) on {opts.bytes} bytes of the standard library's "
             f"source, {opts.steps} steps of {opts.batch} x {opts.block} bytes; compiled arms lowered with "
             f"{opts.lower}; {opts.threads} threads", "",
             tabulate([[fmt(r.get(c)) for c in cols] for r in rows], headers=cols, tablefmt="github",
                      disable_numparse=True)]
    for r in rows:
        if "cosmic" in r:
            c = r["cosmic"]
            lines.append(f"\n{r['arm']}: last CosmicCallback entry: "
                         + ", ".join(f"{k.removeprefix('cosmic/')}={fmt(v)}" for k, v in c.items() if v is not None))
    names = [r["arm"] for r in rows]
    if ARMS["resumed"] in names:
        a = torch.load(workdir / "final.pt")
        b = torch.load(workdir / "final-resumed.pt")
        params = [k for k in a if not k.startswith("cosmic_state.")]
        diff = max((a[k].float() - b[k].float()).abs().max().item() for k in params)
        same = all(torch.equal(a[k], b[k]) for k in params)
        def equal_with_nan(x, y):
            return torch.equal(x, y) or (x.is_floating_point() and torch.equal(x.isnan(), y.isnan())
                                         and torch.equal(x.nan_to_num(), y.nan_to_num()))

        state_same = all(equal_with_nan(a[k], b[k]) for k in a if k.startswith("cosmic_state."))
        lines.append(f"\nresumed from checkpoint-{opts.steps // 2} in a new Trainer: final parameters "
                     f"{'bit-identical to' if same else 'differ from'} the uninterrupted cosmic run "
                     f"(max |diff| {diff:.3g}); cosmic state {'identical' if state_same else 'differs'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    import transformers

    transformers.logging.set_verbosity_error()
    opts = parse(argv)
    if opts.arm is not None:  # a child process: one arm, its row as the last line of stdout
        row = run_arm(opts, opts.arm, Path(opts.workdir))
        print(json.dumps(row))
        return [row]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(opts.workdir or tmp)
        rows = [run_arm(opts, arm, workdir) if opts.quick else arm_in_process(opts, arm, workdir)
                for arm in opts.arm_list]
        print(report(rows, workdir, opts))
    return rows


if __name__ == "__main__":
    main()
