"""Hugging Face models from tiny configs (no download) as a first user meets them: the backend's
warning names sites as `explain` does, `explain` says which path it took in a user's words, and
`cosmic_fx.export` handles models that return a key/value cache."""

import logging
import re

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import cosmic_fx
from cosmic_fx import CosmicConfig
from cosmic_fx.export import ExportError
from cosmic_fx.notices import _WARNED

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def mistral():
    cfg = transformers.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                     head_dim=16)
    return transformers.MistralForCausalLM(cfg)


def phi():
    cfg = transformers.PhiConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=32)
    return transformers.PhiForCausalLM(cfg)


def gpt_neox():
    cfg = transformers.GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, max_position_embeddings=32)
    return transformers.GPTNeoXForCausalLM(cfg)


MODELS = {"mistral": mistral, "phi": phi, "gpt-neox": gpt_neox}


def ids(batch=2, length=8):
    return torch.randint(0, 64, (batch, length))


@pytest.mark.parametrize("name", ["mistral", "phi"])
def test_backend_warning_names_sites_as_explain_does(name):
    torch.manual_seed(0)
    model, x = MODELS[name](), ids()
    explained = [s.name for s in cosmic_fx.explain(model, x).sites if s.qualifies]
    first = explained[0]
    assert first == "model.layers.0.self_attn.q_proj"  # the module tree's name
    _WARNED.clear()
    compiled = torch.compile(model, backend="cosmic", options={"lower": "aot_eager"})
    with pytest.warns(UserWarning, match=rf"was not transformed.*\(sites {re.escape(first)}, ") as record:
        compiled(x)
    message = next(str(w.message) for w in record if "was not transformed" in str(w.message))
    warned = re.search(r"\(sites (.*?)(?: \.\.\.)?\):", message).group(1).split(", ")
    assert warned == explained[: len(warned)] and len(warned) == 5
    cosmic_fx.detach_hooks(model)


def test_explain_says_which_path_and_why_for_a_hugging_face_model(caplog):
    torch.manual_seed(0)
    with caplog.at_level(logging.DEBUG, logger="cosmic_fx"):
        report = cosmic_fx.explain(phi(), ids())
    assert report.path == "module_swap"
    assert re.fullmatch(r"path: module swap \(forward hooks on each site\), because this model's forward cannot "
                        r"be traced by torch\.fx\.symbolic_trace, which is normal for Hugging Face models; "
                        r"nothing is lost: .*", report.note)
    assert "symbolic_trace failed" not in str(report) and "co_varnames" not in str(report)
    assert report.note in str(report).splitlines()[:3]
    # the tracer's own error is there for whoever wants it, at debug level
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG and r.name == "cosmic_fx.inspect"]
    assert any("does not symbolic-trace" in m and "co_varnames" in m for m in debug)


@pytest.mark.parametrize("name", ["mistral", "phi", "gpt-neox"])
def test_export_of_a_model_that_returns_a_cache_turns_the_cache_off(name, tmp_path):
    torch.manual_seed(0)
    model, x = MODELS[name]().eval(), ids(batch=3)
    assert model.config.use_cache is True  # the default config: the forward returns a DynamicCache
    tm = cosmic_fx.transform(model, CosmicConfig())
    path = cosmic_fx.export(tm, x, tmp_path / "model.pt2")
    assert model.config.use_cache is True and tm.config.use_cache is True  # restored
    program = torch.export.load(path).module()
    other = ids(batch=5)
    got = program(other)
    got = got["logits"] if isinstance(got, dict) else got[0]
    with torch.no_grad():
        expected = tm.eval()(other, use_cache=False).logits
    assert_close(got, expected)


class ReturnsCache(nn.Module):
    """Returns a Hugging Face DynamicCache next to its output, with no config to turn it off."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)

    def forward(self, x):
        cache = transformers.DynamicCache()
        h = self.fc(x)
        cache.update(h[:, None, None, :], h[:, None, None, :], 0)
        return h, cache


def test_export_error_says_the_cache_is_the_problem(tmp_path):
    with pytest.raises(ExportError, match=r"cannot export ReturnsCache: its forward returns a key/value cache "
                                          r"\(a Hugging Face Cache object\).*use_cache=False"):
        cosmic_fx.export(ReturnsCache(), torch.rand(4, 8), tmp_path / "m.pt2", config=CosmicConfig(csc="none"))
