"""The docstring examples of the site modules run (and stay true)."""

import doctest
import importlib

import pytest

MODULES = ["cosmic_fx.compiled", "cosmic_fx.config", "cosmic_fx.outputs", "cosmic_fx.policy", "cosmic_fx.runtime.cce",
           "cosmic_fx.runtime.fused",
           "cosmic_fx.runtime.fused_optimizer", "cosmic_fx.runtime.optim_update", "cosmic_fx.runtime.prefix",
           "cosmic_fx.sequential", "cosmic_fx.site", "cosmic_fx.site_hooks", "cosmic_fx.sites", "cosmic_fx.tracer"]


@pytest.mark.parametrize("name", MODULES)
def test_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 0
