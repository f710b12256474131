"""The primary tensor of a model output, replaced with the container's type kept."""

import collections

import pytest
import torch

from cosmic_fx.outputs import map_primary, primary_path

Pair = collections.namedtuple("Pair", "loss logits")
LOSS, LOGITS, INTS = torch.tensor(2.0), torch.ones(2, 3), torch.ones(2, dtype=torch.long)

CASES = [  # (output, path to the primary tensor)
    (LOGITS, ()),
    (LOSS, ()),  # a bare 0-d output is the output
    ((LOSS, LOGITS), (1,)),  # a 0-d loss first in a tuple is skipped
    (Pair(LOSS, LOGITS), (1,)),
    ({"loss": torch.ones(2), "hidden": LOGITS}, ("hidden",)),  # "loss" never, whatever its shape
    ({"hidden": torch.zeros(2, 2), "logits": LOGITS}, ("logits",)),  # "logits" first
    ([INTS, [LOGITS]], (1, 0)),
    ((INTS, None), None),
]


@pytest.mark.parametrize("out, path", CASES)
def test_primary_path_and_same_type(out, path):
    assert primary_path(out) == path
    new = map_primary(out, lambda t: t * 3)
    assert type(new) is type(out)
    if path is None:
        assert new is out
        return
    leaf_old, leaf_new = out, new
    for key in path:
        leaf_old, leaf_new = leaf_old[key], leaf_new[key]
    assert torch.equal(leaf_new, leaf_old * 3)


def test_model_output_keeps_attribute_access():
    modeling_outputs = pytest.importorskip("transformers.modeling_outputs")
    out = modeling_outputs.CausalLMOutput(loss=LOSS, logits=LOGITS)
    new = map_primary(out, lambda t: t + 1)
    assert type(new) is type(out) and torch.equal(new.logits, LOGITS + 1) and new.loss is LOSS
    assert torch.equal(new["logits"], new.logits)


class _MappingOut(torch.nn.Module):
    """A traceable model returning a mapping of its own class (fx alone would turn it into a dict)."""

    def __init__(self, make) -> None:
        super().__init__()
        self.fc, self.make = torch.nn.Linear(8, 16), make

    def forward(self, x):
        logits = self.fc(x)
        return self.make(loss=logits.pow(2).mean(), logits=logits)


@pytest.mark.parametrize("kind", ["model_output", "ordered_dict"])
@pytest.mark.parametrize("csc", ["output", "none"])
def test_traced_path_keeps_the_mapping_class(kind, csc):
    import cosmic_fx

    if kind == "model_output":
        outputs = pytest.importorskip("transformers.modeling_outputs", reason="transformers is not installed")
        make = outputs.CausalLMOutput
    else:
        make = collections.OrderedDict
    torch.manual_seed(0)
    model = _MappingOut(make)
    tm = cosmic_fx.transform(model, cosmic_fx.CosmicConfig(csc=csc))
    assert cosmic_fx.transform_info(tm).path == "symbolic_trace"
    x = torch.rand(3, 8)
    out, ref = tm(x), model(x)
    assert type(out) is make and list(out.keys()) == ["loss", "logits"]
    # the loss is computed from the logits the model returns (CSC on the output layer's output)
    torch.testing.assert_close(out["loss"], out["logits"].pow(2).mean())
    if csc == "none":
        torch.testing.assert_close(out["loss"], ref["loss"], rtol=0, atol=0)  # identity-init QCI
    expected = cosmic_fx.cosmic_state_compression(ref["logits"]) if csc == "output" else ref["logits"]
    torch.testing.assert_close(out["logits"], expected)
    if kind == "model_output":
        assert out.logits is out["logits"]
