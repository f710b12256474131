"""Every public entry point given something that is not an nn.Module (issue 16 item 5): the same
TypeError, naming what was passed and what to pass, before anything reads the argument
(cosmic_fx.compile(lambda x: x * 2) raised AttributeError: 'function' object has no attribute 'modules')."""

import pytest
import torch
from torch import nn

import cosmic_fx


def _fn(x):
    return x * 2


ENTRY_POINTS = {
    "transform": lambda m: cosmic_fx.transform(m),
    "compile": lambda m: cosmic_fx.compile(m),
    "attach_hooks": lambda m: cosmic_fx.attach_hooks(m),
    "detach_hooks": lambda m: cosmic_fx.detach_hooks(m),
    "explain": lambda m: cosmic_fx.explain(m, torch.randn(2, 4)),
    "export": lambda m: cosmic_fx.export(m, torch.randn(2, 4), "unused.pt2"),
    "runtime_of": lambda m: cosmic_fx.runtime_of(m),
    "hooks_of": lambda m: cosmic_fx.hooks_of(m),
    "load_adapter": lambda m: cosmic_fx.load_adapter(m, "unused"),
    "fused_optimizer": lambda m: cosmic_fx.fused_optimizer(m),
    "PrefixCache": lambda m: cosmic_fx.PrefixCache(m),
    "watch_optimizer": lambda m: cosmic_fx.watch_optimizer(m, None),
}

NOT_MODULES = [
    (lambda x: x * 2, r"got function <lambda>\. Pass the model itself .* To compile a plain function, use "
                      r"torch\.compile\(fn\)"),
    (_fn, r"got function _fn\."),
    (nn.Linear, r"got the class Linear\. Pass an instance: Linear\(\.\.\.\)"),
    ("gpt2", r"got str\. Pass the model itself \(an nn\.Module instance"),
]


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize(("obj", "says"), NOT_MODULES, ids=["lambda", "function", "class", "str"])
def test_every_entry_point_names_what_to_pass(entry, obj, says):
    with pytest.raises(TypeError, match=rf"cosmic_fx\.{entry} expects an nn\.Module; {says}"):
        ENTRY_POINTS[entry](obj)


def test_runtime_of_still_takes_a_parameter():
    tm = cosmic_fx.transform(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2)))
    assert cosmic_fx.runtime_of(tm[0].weight) is cosmic_fx.runtime_of(tm)
