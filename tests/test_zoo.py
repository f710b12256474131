"""``cosmic-fx bench zoo``: its checks pass on a model that must pass, fail on a model that must fail,
turn a missing library into a skipped line and an exception into one cell's failure; and the quick
subset's Hugging Face model really runs (``make test`` installs transformers)."""

import pytest
import torch
from torch import nn

from cosmic_fx import cli
from cosmic_fx.bench import zoo
from cosmic_fx.bench.zoo_models import (
    AttentionHead,
    EncoderLM,
    FunctionalMLP,
    LibraryMissing,
    Seq2Seq,
    TiedLM,
    ZooModel,
)
from cosmic_fx.bench.zoo_runs import linear_like_layers, primary_tensor, train_run

from .conftest import Untraceable

FAST = zoo.Settings(steps=3, extra_batches=())  # aot_eager, one batch size: a few seconds per model


def _x(batch):
    return (torch.randn(batch, 8, generator=torch.Generator().manual_seed(batch)),)


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class Broken(nn.Module):
    """Output noise in every mode (parity and the .pt2 round trip must fail) and a crash in training."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 32)

    def forward(self, x):
        if self.training:
            raise RuntimeError("broken in training")
        out = self.fc(x)
        return out + 1e-3 * torch.rand_like(out)


def _missing():
    raise LibraryMissing("foolib not installed")


def _build_fails():
    raise OSError("disk on fire")


def test_a_model_that_must_pass_passes_and_a_broken_one_fails_the_right_columns():
    good = zoo.run_model(ZooModel("wide", "torch", Wide, _x), FAST)
    for key in ("sites", "parity", "train", "off_parity", "graphs", "fallbacks", "export"):
        assert good.cells[key].status == "pass", (key, good.cells[key])
    assert good.cells["sites"].text == "2/2 (1 too narrow)"  # head is 4 wide: not a site
    assert good.cells["parity"].text == good.cells["off_parity"].text == good.cells["export"].text == "exact"
    assert good.cells["fallbacks"].text == "0" and "→" in good.cells["train"].text

    bad = zoo.run_model(ZooModel("broken", "torch", Broken, _x), FAST)
    status = {k: c.status for k, c in bad.cells.items()}
    assert status["sites"] == "pass" and bad.cells["sites"].text == "1/1"
    assert status["parity"] == status["export"] == "fail" and bad.cells["parity"].text.startswith("max abs Δ ")
    assert status["train"] == "fail" and "RuntimeError: broken in training" in bad.cells["train"].text
    # plain torch.compile fails the same way: off-parity does not apply; runs that never finished cannot pass
    assert status["off_parity"] == "n/a" and "torch.compile itself fails" in bad.cells["off_parity"].text
    assert status["graphs"] == status["fallbacks"] == "fail"

    skipped = zoo.run_model(ZooModel("needs-foolib", "foolib", _missing, _x), FAST)
    unbuilt = zoo.run_model(ZooModel("unbuilt", "torch", _build_fails, _x), FAST)
    assert skipped.skipped == "foolib not installed" and not skipped.cells
    assert all(c.status == "fail" and "model did not build: OSError: disk on fire" in c.text
               for c in unbuilt.cells.values()) and len(unbuilt.cells) == len(zoo.COLUMNS)

    rows = [good, bad, skipped, unbuilt]
    rates = zoo.pass_rates(rows)
    assert rates["parity"] == (1, 3) and rates["off_parity"] == (1, 2)  # skipped rows and n/a cells excluded
    table = zoo.render(rows, FAST)
    assert "skipped: foolib not installed" in table and "| **pass rate** |" in table
    assert "- broken / trains (loss): RuntimeError: broken in training" in table
    assert "3 model(s) ran, 1 skipped" in table
    payload = zoo.to_json(rows, FAST)
    assert payload["pass_rate"]["parity"] == {"passed": 1, "applicable": 3}
    assert payload["models"][1]["cells"]["train"]["status"] == "fail"


def test_eager_fallbacks_are_counted():
    """A recompile limit of 1 and a new static batch size every step: dynamo runs the later steps eagerly."""
    model = Wide()
    with torch._dynamo.config.patch(recompile_limit=1):
        run = train_run(model, lambda m: torch.compile(m, backend="eager", dynamic=False),
                        [_x(4), _x(5), _x(6)], lr=1e-3, seed=0)
    assert run.error is None and run.forwards == 3
    assert run.eager_calls == 2 and run.limit_hits >= 1
    cell = zoo._col_fallbacks(run, run)
    assert cell.status == "fail" and cell.text.startswith("2 of 3 steps eager, recompile limit hit")


def test_graph_breaks_are_counted_and_are_not_eager_fallbacks():
    run = train_run(Untraceable(), lambda m: torch.compile(m, backend="eager"), [_x(4), _x(4)], lr=1e-3, seed=0)
    assert run.error is None and run.breaks >= 1 and run.graphs >= 2
    assert run.eager_calls == 0 and run.limit_hits == 0


def test_linear_like_layers_are_found_through_functional_calls():
    assert linear_like_layers(FunctionalMLP(), (torch.randn(2, 32),)) == {"w1": 64, "w2": 10}
    assert linear_like_layers(TiedLM(), (torch.randint(0, 100, (2, 5)),)) == {"mid": 32, "emb": 100}
    attn = linear_like_layers(AttentionHead(), (torch.randn(2, 8, 32),))
    assert attn == {"attn.in_proj": 96, "attn.out_proj": 32, "head": 16}
    assert len(linear_like_layers(EncoderLM(), (torch.randint(0, 100, (2, 6)),))) == 2 * 4 + 1
    # the decoder's cross-attention splits its packed weight into views: still one layer, named by its parameter
    seq = linear_like_layers(Seq2Seq(), (torch.randn(2, 5, 32), torch.randn(2, 3, 32)))
    assert len(seq) == 4 + 6 and "net.decoder.layers.0.multihead_attn.in_proj" in seq


def test_primary_tensor_and_settings():
    t = torch.ones(2, 3)
    assert primary_tensor(t) is t
    assert primary_tensor((t, torch.zeros(1))) is t
    assert primary_tensor({"ids": torch.ones(2, dtype=torch.long), "logits": t}) is t
    with pytest.raises(TypeError, match="no floating-point tensor in an output of type tuple"):
        primary_tensor((torch.ones(2, dtype=torch.long),))
    with pytest.raises(ValueError, match=r"unknown zoo column\(s\) \['speed'\]; valid: sites, kept"):
        zoo.Settings(columns=("speed",))
    with pytest.raises(ValueError, match="the zoo needs batch >= 2 and steps >= 2"):
        zoo.Settings(batch=1)


def test_quick_subset_hugging_face_model_runs():
    pytest.importorskip("transformers")
    spec = next(m for m in zoo.select(zoo.all_models(), "^hf-gpt2$", quick=True))
    row = zoo.run_model(spec, zoo.Settings(columns=("sites", "parity")))
    # 2 blocks x (c_attn, attn c_proj, c_fc, mlp c_proj) HF Conv1D layers + lm_head (tied to wte)
    assert row.skipped is None and row.cells["sites"].text.endswith("/9")
    assert row.cells["parity"].status == "pass"


def test_cli_lists_and_filters(capsys):
    assert cli.main(["bench", "zoo", "--list", "--quick"]) == 0
    quick = capsys.readouterr().out.split("\n")
    assert any(line.startswith("hf-gpt2 ") for line in quick) and not any(line.startswith("tv-") for line in quick)
    assert cli.main(["bench", "zoo", "--list", "--models", "^tv-"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert len(listed) >= 10 and all(name.startswith("tv-") for name in listed)
    assert len(zoo.all_models()) >= 25
    assert cli.main(["bench", "zoo", "--columns", "sites,speed"]) == 1
    assert "cosmic-fx: error: unknown zoo column(s) ['speed']; valid: sites, kept" in capsys.readouterr().err
    assert cli.main(["bench", "zoo", "--threads", "0"]) == 1
    assert "--threads must be >= 1 and --steps >= 2; got 0 and 5" in capsys.readouterr().err
