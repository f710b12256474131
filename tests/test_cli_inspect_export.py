"""`cosmic-fx inspect` and `cosmic-fx export`: outputs, exit codes (0 ok, 2 usage, 1 failure), stderr."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from cosmic_fx import cosmic_state_compression
from cosmic_fx.cli import main

MODEL_FILE = textwrap.dedent(
    """
    import torch
    from torch import nn


    def build():
        return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))


    def lm():
        from cosmic_fx.models import TinyTransformerLM

        return TinyTransformerLM(vocab=24, dim=16, heads=2, layers=1, context=8)


    def broken():
        raise RuntimeError("no weights here")


    def not_a_model():
        return 42


    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 16)

        def forward(self, x):
            h = self.fc(x)
            if h.sum() > 0:
                h = h * 2
            return h
    """
)


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "zoo.py"
    path.write_text(MODEL_FILE)
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_table(model_file, capsys):
    code, out, err = run(capsys, "inspect", f"{model_file}:build", "--input-shape", "4,8")
    assert code == 0 and err == ""
    assert "sites: 2 found, 1 rewritten" in out
    assert "| 0      | linear | (4, 8)  | (4, 32)  | yes" in out
    assert "| 2      | linear | (4, 32) | (4, 4)   | no: width 4 <= 10" in out
    assert "cosmic_qci.0.weight (new)" in out


@pytest.mark.parametrize("fmt", ["code", "diff", "dot", "json"])
def test_inspect_formats(fmt, model_file, capsys, tmp_path):
    code, out, _ = run(capsys, "inspect", f"{model_file}:build", "--input-shape", "4,8", "--csc", "sites",
                       "--format", fmt)
    assert code == 0
    if fmt == "code":
        assert 'cosmic_qci_0 = getattr(self.cosmic_qci, "0")(_0)\n' in out
        assert '_1 = getattr(self, "1")(cosmic_csc_0)\n' in out
    elif fmt == "diff":
        added = [line for line in out.splitlines() if line.startswith("+") and not line.startswith("+++")]
        names = [line.split(" = ")[0] for line in added]
        assert [n.strip("+ ") for n in names if "cosmic" in n] == ["cosmic_qci_0", "cosmic_csc_0"]
    elif fmt == "dot":
        assert out.startswith('digraph "Sequential" {') and '"cosmic_qci_0" [' in out
    else:
        data = json.loads(out)
        assert [s["name"] for s in data["sites"]] == ["0", "2"] and data["config"]["csc"] == "sites"
    target = tmp_path / f"out.{fmt}"
    assert run(capsys, "inspect", f"{model_file}:build", "--input-shape", "4,8", "--csc", "sites", "--format", fmt,
               "-o", target)[:2] == (0, "")
    assert target.read_text() == out


def test_inspect_module_factory_and_int_inputs(model_file, capsys):
    code, out, _ = run(capsys, "inspect", f"{model_file}:lm", "--input-shape", "2,8", "--input-dtype", "int64",
                       "--int-high", "24", "--preset", "seed")
    assert code == 0 and "5 found, 5 rewritten" in out and "CDG (seed)" in out
    code, out, _ = run(capsys, "inspect", "cosmic_fx.models:DigitsCNN", "--input-shape", "2,1,8,8")
    assert code == 0 and "| conv1  | conv2d | (2, 1, 8, 8)" in out


def test_inspect_svg_without_graphviz_fails_cleanly(model_file, capsys, monkeypatch):
    import cosmic_fx.report as report_mod

    monkeypatch.setattr(report_mod.shutil, "which", lambda name: None)
    code, out, err = run(capsys, "inspect", f"{model_file}:build", "--input-shape", "4,8", "--format", "svg")
    assert code == 1 and out == ""
    assert err.startswith("cosmic-fx: error: Graphviz's `dot` program was not found")


def test_help_shows_examples(capsys):
    for command in ("inspect", "export"):
        code, out, _ = run(capsys, command, "--help")
        assert code == 0
        assert "examples:" in out and f"cosmic-fx {command} cosmic_fx.models:DigitsCNN --input-shape 8,1,8,8" in out


@pytest.mark.parametrize("argv, message", [
    (["inspect", "m.py:build"], "the following arguments are required: --input-shape"),
    (["inspect", "m.py:build", "--input-shape", "4,x"], "'4,x' is not a shape; expected comma-separated sizes"),
    (["inspect", "m.py:build", "--input-shape", "4,0"], "every size must be a positive integer"),
    (["inspect", "m.py:build", "--input-shape", "4,8", "--format", "png"], "invalid choice: 'png'"),
    (["export", "m.py:build", "--input-shape", "4,8", "--format", "pt2"], "required: -o/--output"),
    (["export", "m.py:build", "--input-shape", "4,8", "--format", "tflite", "-o", "x"], "invalid choice: 'tflite'"),
])
def test_usage_errors_exit_2(argv, message, capsys):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert message in err and err.startswith("usage: cosmic-fx")


@pytest.mark.parametrize("spec, shape, message", [
    ("{dir}/missing.py:build", "4,8", "missing.py: no such file"),
    ("{file}:nope", "4,8", "has no callable 'nope'; it defines: Branchy, broken, build, lm, not_a_model"),
    ("{file}", "4,8", "expected FILE.py:FACTORY"),
    ("{file}:broken", "4,8", "zoo.py:broken() failed: RuntimeError: no weights here"),
    ("{file}:not_a_model", "4,8", "returned int, not an nn.Module"),
    ("{file}:build", "4,3", "--input-shape 4,3 does not fit Sequential: RuntimeError: mat1 and mat2 shapes cannot be "
                            "multiplied (4x3 and 8x32) (its first layer 0 is Linear(in_features=8, out_features=32, "
                            "bias=True): it expects inputs of shape (..., 8))"),
    ("no_such_package_xyz.models:build", "4,8", "cannot import 'no_such_package_xyz.models'"),
])
def test_failures_exit_1_with_a_message(spec, shape, message, model_file, capsys):
    spec = spec.format(file=model_file, dir=model_file.parent)
    code, out, err = run(capsys, "inspect", spec, "--input-shape", shape)
    assert code == 1 and out == ""
    assert err.startswith("cosmic-fx: error: ") and message in err
    assert "Traceback" not in err


@pytest.mark.parametrize("fmt", ["pt2", "onnx", "adapter"])
def test_export_writes_and_checks(fmt, model_file, capsys, tmp_path):
    if fmt == "onnx":
        pytest.importorskip("onnxscript")
    target = tmp_path / f"model.{fmt}"
    code, out, err = run(capsys, "export", f"{model_file}:build", "--input-shape", "4,8", "--format", fmt, "-o", target)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"wrote {target} ({fmt}, ") and "(1 of 2 sites rewritten: 0)" in lines[0]
    assert lines[1].startswith("checked: reloaded with ") and "input 7x8" in lines[1]
    assert target.exists()
    if fmt == "pt2":
        assert torch.export.load(target).module()(torch.rand(3, 8)).shape == (3, 4)


def test_export_failures(model_file, capsys, tmp_path):
    code, out, err = run(capsys, "export", f"{model_file}:Branchy", "--input-shape", "4,8", "--format", "pt2",
                         "-o", tmp_path / "b.pt2")
    assert code == 1 and out == ""
    assert "cannot export Branchy" in err and "zoo.py:" in err and "if h.sum() > 0:" in err and "Traceback" not in err
    code, _, err = run(capsys, "export", f"{model_file}:build", "--input-shape", "1,8", "--format", "pt2",
                       "-o", tmp_path / "one.pt2")
    assert code == 1 and "--static-batch" in err
    assert run(capsys, "export", f"{model_file}:build", "--input-shape", "1,8", "--format", "pt2", "--static-batch",
               "-o", tmp_path / "one.pt2")[0] == 0


def test_weights_option_loads_a_state_dict_safely(model_file, capsys, tmp_path):
    from safetensors.torch import save_file
    from torch import nn

    torch.manual_seed(5)
    trained = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    save_file(trained.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    for weights in ("w.safetensors", "w.pt"):
        code, out, _ = run(capsys, "export", f"{model_file}:build", "--input-shape", "4,8", "--weights",
                           tmp_path / weights, "--format", "pt2", "-o", tmp_path / f"{weights}.pt2")
        assert code == 0
        x = torch.rand(3, 8)
        exported = torch.export.load(tmp_path / f"{weights}.pt2").module()
        with torch.no_grad():  # identity QCI, CSC at the output (the default config): only the weights decide
            assert_close(exported(x), cosmic_state_compression(trained(x)), rtol=1e-5, atol=1e-6)
    torch.save({"x": object()}, tmp_path / "evil.pt")  # not loadable with weights_only=True
    inspect_args = ("inspect", f"{model_file}:build", "--input-shape", "4,8", "--weights")
    code, _, err = run(capsys, *inspect_args, tmp_path / "evil.pt")
    assert code == 1 and "is not a readable state_dict" in err
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "w.safetensors").read_bytes()[:50])
    code, _, err = run(capsys, *inspect_args, tmp_path / "cut.safetensors")
    assert code == 1 and "it may be corrupt" in err
    code, _, err = run(capsys, *inspect_args, tmp_path / "none.pt")
    assert code == 1 and "none.pt: no such file" in err


def test_exit_codes_in_a_real_process(model_file):
    script = Path(sys.executable).with_name("cosmic-fx")  # the installed console script
    if not script.exists():
        pytest.skip("the cosmic-fx console script is not installed next to this interpreter")
    usage = subprocess.run([script, "inspect", f"{model_file}:build"], capture_output=True, text=True, timeout=120)
    assert usage.returncode == 2 and "--input-shape" in usage.stderr and usage.stdout == ""
    failure = subprocess.run([script, "inspect", f"{model_file}:build", "--input-shape", "4,5"],
                             capture_output=True, text=True, timeout=120)
    assert failure.returncode == 1 and failure.stdout == ""
    assert failure.stderr.startswith("cosmic-fx: error: --input-shape 4,5 does not fit Sequential")
