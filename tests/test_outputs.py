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
