"""The models of ``cosmic-fx bench zoo``: torch built-ins and Hugging Face transformers from small configs.

Every entry builds a small, randomly initialised model (no download) and positional example inputs
for any batch size. A library that is not installed raises :class:`LibraryMissing` from the builder,
which the zoo turns into a "skipped" line. torchvision and timm models live in
:mod:`cosmic_fx.bench.zoo_vision` (they need an isolated install, see there).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["LibraryMissing", "ZooModel", "all_models"]

IMAGE = 32  # side of the images fed to every vision model
SEQ = 16  # tokens per sequence fed to every language model
VOCAB = 100


class LibraryMissing(Exception):
    """The model's library is not installed (or does not load here): its row says "skipped: <why>"."""


@dataclasses.dataclass(frozen=True)
class ZooModel:
    """One model of the zoo.

    Attributes:
        name: short unique name (``--models`` filters on it).
        library: ``"torch"``, ``"transformers"``, ``"torchvision"`` or ``"timm"``.
        build: returns the model (random init; the caller seeds the RNG).
        inputs: batch size -> the positional arguments of ``forward`` (deterministic per batch size).
        quick: part of ``--quick`` (and of the test suite's run).
    """

    name: str
    library: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], tuple[Any, ...]]
    quick: bool = False


def _gen(batch: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 + batch)


def images(batch: int, channels: int = 3, side: int = IMAGE) -> tuple[torch.Tensor]:
    return (torch.rand(batch, channels, side, side, generator=_gen(batch)),)


def tokens(batch: int, seq: int = SEQ, vocab: int = VOCAB) -> tuple[torch.Tensor]:
    return (torch.randint(0, vocab, (batch, seq), generator=_gen(batch)),)


def _features(batch: int, *shape: int) -> tuple[torch.Tensor]:
    return (torch.randn(batch, *shape, generator=_gen(batch)),)


# ----------------------------------------------------------------------------- torch built-ins
class BatchNormCNN(nn.Module):
    """Conv-BN-ReLU twice, global pooling, a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class TiedLM(nn.Module):
    """Embedding and output head share one weight (weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32)
        self.mid = nn.Linear(32, 32)
        self.head = nn.Linear(32, VOCAB, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(self.emb(idx))))


class FunctionalMLP(nn.Module):
    """Its own parameters, applied with ``F.linear`` (no ``nn.Linear`` anywhere)."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(64, 32) / 32**0.5)
        self.b1 = nn.Parameter(torch.zeros(64))
        self.w2 = nn.Parameter(torch.randn(10, 64) / 8)
        self.b2 = nn.Parameter(torch.zeros(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.relu(F.linear(x, self.w1, self.b1)), self.w2, self.b2)


class RNNHead(nn.Module):
    """An LSTM or GRU over a sequence, a Linear head on the last step."""

    def __init__(self, kind: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = kind(16, 32, num_layers=1, batch_first=True)
        self.head = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class AttentionHead(nn.Module):
    """A bare ``nn.MultiheadAttention`` (self-attention), then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.attn(x, x, x, need_weights=False)
        return self.head(out)


class EncoderLM(nn.Module):
    """Embedding, ``nn.TransformerEncoder`` (2 layers, dropout), a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32)
        layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.emb(idx)))


class Seq2Seq(nn.Module):
    """``nn.Transformer`` (encoder-decoder) on feature sequences."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Transformer(d_model=32, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                                  dim_feedforward=64, dropout=0.1, batch_first=True)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return self.net(src, tgt)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _dropout_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 10))


def _digits_cnn() -> nn.Module:
    from ..models import DigitsCNN

    return DigitsCNN()


def _seq2seq_inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(batch)
    return torch.randn(batch, 10, 32, generator=g), torch.randn(batch, 6, 32, generator=g)


TORCH_MODELS = [
    ZooModel("mlp", "torch", _mlp, lambda b: _features(b, 32), quick=True),
    ZooModel("digits-cnn", "torch", _digits_cnn, lambda b: images(b, 1, 8), quick=True),
    ZooModel("batchnorm-cnn", "torch", BatchNormCNN, images),
    ZooModel("dropout-mlp", "torch", _dropout_mlp, lambda b: _features(b, 32)),
    ZooModel("tied-lm", "torch", TiedLM, tokens, quick=True),
    ZooModel("functional-linear", "torch", FunctionalMLP, lambda b: _features(b, 32), quick=True),
    ZooModel("lstm-head", "torch", lambda: RNNHead(nn.LSTM), lambda b: _features(b, 8, 16)),
    ZooModel("gru-head", "torch", lambda: RNNHead(nn.GRU), lambda b: _features(b, 8, 16)),
    ZooModel("multihead-attention", "torch", AttentionHead, lambda b: _features(b, 8, 32), quick=True),
    ZooModel("transformer-encoder-lm", "torch", EncoderLM, tokens, quick=True),
    ZooModel("nn-transformer", "torch", Seq2Seq, _seq2seq_inputs),
]


# ----------------------------------------------------------------------------- Hugging Face transformers
def _transformers():
    try:
        import transformers
    except ImportError:
        raise LibraryMissing("transformers not installed (pip install 'cosmic-fx[zoo]')") from None
    except Exception as err:  # noqa: BLE001 - e.g. a broken torchvision next to it
        first_line = str(err).splitlines()[0]
        raise LibraryMissing(f"transformers does not import here: {type(err).__name__}: {first_line}") from None
    return transformers


def _hf(model_cls: str, config_cls: str, **config: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        tf = _transformers()
        cfg = getattr(tf, config_cls)(**config)
        return getattr(tf, model_cls)(cfg)

    return build


def _t5_inputs(batch: int) -> tuple[torch.Tensor, ...]:
    (ids,) = tokens(batch)
    decoder = torch.randint(0, VOCAB, (batch, 8), generator=_gen(batch + 500))
    return ids, torch.ones_like(ids), decoder


_SMALL = dict(vocab_size=VOCAB, use_cache=False)
_DECODER = dict(_SMALL, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=64)

HF_MODELS = [
    ZooModel("hf-bert", "transformers", _hf(
        "BertForSequenceClassification", "BertConfig", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64, num_labels=3), tokens, quick=True),
    ZooModel("hf-distilbert", "transformers", _hf(
        "DistilBertForSequenceClassification", "DistilBertConfig", vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2,
        hidden_dim=64, max_position_embeddings=64, num_labels=3), tokens),
    ZooModel("hf-gpt2", "transformers", _hf(
        "GPT2LMHeadModel", "GPT2Config", n_positions=64, n_embd=32, n_layer=2, n_head=2, **_SMALL), tokens,
        quick=True),
    ZooModel("hf-t5", "transformers", _hf(
        "T5ForConditionalGeneration", "T5Config", d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2,
        num_heads=2, decoder_start_token_id=0, **_SMALL), _t5_inputs),
    ZooModel("hf-bart", "transformers", _hf(
        "BartForConditionalGeneration", "BartConfig", d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_position_embeddings=64, **_SMALL), tokens),
    ZooModel("hf-llama", "transformers", _hf("LlamaForCausalLM", "LlamaConfig", **_DECODER), tokens, quick=True),
    ZooModel("hf-qwen2", "transformers", _hf("Qwen2ForCausalLM", "Qwen2Config", **_DECODER), tokens),
    ZooModel("hf-vit", "transformers", _hf(
        "ViTForImageClassification", "ViTConfig", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, image_size=IMAGE, patch_size=8, num_labels=10), images),
]


def all_models() -> list[ZooModel]:
    """Every model of the zoo, in table order (torch, transformers, torchvision, timm)."""
    from .zoo_vision import TIMM_MODELS, TORCHVISION_MODELS

    return [*TORCH_MODELS, *HF_MODELS, *TORCHVISION_MODELS, *TIMM_MODELS]
