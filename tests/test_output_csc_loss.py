"""Output CSC acts where the model's own loss sees it (issue 16 item 1): on the output layer's output
(the last site, after its QCI), so the loss a forward computes from its logits is the loss of the
logits it returns. Before, CSC was applied to the forward's result: a Hugging Face model's out.loss
ignored it (GPT-2: 4.91442 vs 4.91545 for the cross-entropy of out.logits)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

import cosmic_fx
from cosmic_fx import CosmicConfig

from .test_hf_models import CASES

transformers = pytest.importorskip("transformers")


def convnext():
    cfg = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[16, 32], depths=[1, 1], num_stages=2,
                                      image_size=16, num_labels=4)
    return transformers.ConvNextForImageClassification(cfg)


def lm_loss(logits, labels, shift):
    """The models' own loss, written out: (shifted) token cross-entropy, -100 ignored."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)


MODELS = {
    "gpt2": (CASES["gpt2"][0], CASES["gpt2"][1], lambda out, inp: lm_loss(out.logits, inp["labels"], shift=True),
             "lm_head"),
    "t5": (CASES["t5"][0], CASES["t5"][1], lambda out, inp: lm_loss(out.logits, inp["labels"], shift=False), "lm_head"),
    "bert": (CASES["bert"][0], CASES["bert"][1], lambda out, inp: F.cross_entropy(out.logits, inp["labels"]),
             "classifier"),
    "vit": (CASES["vit"][0], CASES["vit"][1], lambda out, inp: F.cross_entropy(out.logits, inp["labels"]),
            "classifier"),
    "convnext": (convnext, lambda: {"pixel_values": torch.rand(2, 3, 16, 16), "labels": torch.tensor([1, 3])},
                 lambda out, inp: F.cross_entropy(out.logits, inp["labels"]), "classifier"),
}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_hf_loss_is_the_loss_of_the_returned_logits(name, train):
    factory, make_inputs, loss_of, head = MODELS[name]
    torch.manual_seed(0)
    model = factory().train(train)
    inputs = make_inputs()
    tm = cosmic_fx.transform(model, CosmicConfig(csc="output"))
    assert cosmic_fx.transform_info(tm).output_csc == head
    out = tm(**inputs)
    assert_close(out.loss, loss_of(out, inputs))
    # and CSC did act: the logits are the compressed head output (identity QCI: the model's own logits)
    if not train:
        with torch.no_grad():
            ref = model(**inputs).logits
        assert_close(out.logits, cosmic_fx.cosmic_state_compression(ref, 0.5))
        assert not torch.allclose(out.logits, ref)


class LossInside(nn.Module):
    """A traceable model that computes its loss inside forward, Hugging Face style."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(8, 32), nn.Linear(32, 12)

    def forward(self, x, labels):
        logits = self.head(self.body(x).relu())
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def test_traced_and_backend_paths_compute_the_loss_from_the_compressed_logits():
    torch.manual_seed(0)
    model = LossInside()
    x, y = torch.randn(4, 8), torch.tensor([0, 3, 5, 11])
    tm = cosmic_fx.transform(model, CosmicConfig(csc="output"))
    info = cosmic_fx.transform_info(tm)
    assert info.path == "symbolic_trace" and info.output_csc == "head"
    out = tm(x, y)
    assert_close(out["loss"], F.cross_entropy(out["logits"], y))
    assert_close(out["logits"], cosmic_fx.cosmic_state_compression(model(x, y)["logits"]))
    # an untransformed model compiled with the backend: the pass runs on dynamo's graph (a fresh model:
    # the backend treats a model whose parameters a transformed model shares as transformed)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LossInside()
    compiled = torch.compile(model, backend="cosmic", options={"lower": "aot_eager", "csc": "output"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the once-per-process notice that the model was not transformed
        out = compiled(x, y)
    assert_close(out["loss"], F.cross_entropy(out["logits"], y))
    assert_close(out["logits"], cosmic_fx.cosmic_state_compression(model(x, y)["logits"]))
    torch._dynamo.reset()


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 16)

    def forward(self, x):
        return self.fc2(self.fc1(x).relu()) * 2


class HeadFirst(nn.Module):
    """Registers its head before its body, and does not trace (module swap reads the module order)."""

    def __init__(self) -> None:
        super().__init__()
        self.head, self.body = nn.Linear(32, 5), nn.Linear(8, 32)

    def forward(self, x):
        h = self.body(x)
        if h.sum() > 0:
            h = h.relu()
        return self.head(h)


class HeadLast(HeadFirst):
    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.body, self.head = nn.Linear(8, 32), nn.Linear(32, 5)


class SharedHead(nn.Module):
    """Calls its head twice, and does not trace (on the traced path CSC follows the last call only)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 16)

    def forward(self, x):
        if x.sum() > 0:
            x = x * 2
        return self.head(x) + self.head(x.flip(-1))


def test_explain_notes_where_output_csc_is_not_on_the_prediction_itself():
    torch.manual_seed(0)
    x = torch.randn(2, 8)
    assert "output CSC" not in cosmic_fx.explain(LossInside(), (x, torch.tensor([1, 2]))).note
    assert "output CSC" not in cosmic_fx.explain(nn.Sequential(nn.Linear(8, 32), nn.Linear(32, 4)), x).note
    scaled = cosmic_fx.explain(Scaled(), x).note
    assert "output CSC acts on the output of the output layer fc2" in scaled and "further operations" in scaled
    first = cosmic_fx.explain(HeadFirst(), x)
    assert first.path == "module_swap"
    assert "output CSC sits on body, the last site in module order" in first.note
    assert "the forward runs head last" in first.note and "Register the head last" in first.note
    shared = cosmic_fx.explain(SharedHead(), x).note
    assert "the output layer head ran 2 times in one forward" in shared
    assert "output CSC" not in cosmic_fx.explain(Scaled(), x, CosmicConfig(csc="none")).note


def test_training_a_model_whose_head_is_not_last_in_module_order_warns():
    torch.manual_seed(0)
    tm = cosmic_fx.transform(HeadFirst(), CosmicConfig(csc="output"))
    cosmic_fx.attach_hooks(tm)
    with pytest.warns(UserWarning, match=r"output CSC acts on body, the last site in HeadFirst's module order, but "
                                         r"its forward runs head last.*Register the output layer last in __init__"):
        tm(torch.randn(2, 8)).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the output layer is learnt at the first forward
        tm(torch.randn(2, 8)).sum().backward()
        ok = cosmic_fx.transform(HeadLast(), CosmicConfig())
        assert cosmic_fx.transform_info(ok).path == "module_swap"
        cosmic_fx.attach_hooks(ok)
        ok(torch.randn(2, 8)).sum().backward()
