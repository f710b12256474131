"""cosmic_fx.export: .pt2, ONNX and adapter files, their loaders, and the errors on bad input."""

import argparse
import json
import os
import pickle
import subprocess
import sys
import textwrap
import warnings
import zipfile

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import cosmic_fx
from cosmic_fx import CosmicConfig
from cosmic_fx.export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CorruptFileError, ExportError, load_onnx, load_program

from .conftest import MODELS, Untraceable

THREE = ["mlp", "cnn", "transformer"]
# random QCIs and CSC after every site: an export that dropped or mangled them could not match
CFG = CosmicConfig(qci_init="seed", csc="sites")
BATCHES = (1, 3, 9)  # the examples use batch 4


def transformed(name, seed=0, config=CFG):
    factory, make_input, _ = MODELS[name]
    torch.manual_seed(seed)
    return cosmic_fx.transform(factory(), config).eval(), make_input


def qci_names(model):
    """QCI parameter names expected from the module tree (traced path)."""
    names = []
    for n, m in model.named_modules():
        width = getattr(m, "out_features", getattr(m, "out_channels", 0))
        if isinstance(m, (nn.Linear, nn.Conv2d)) and width > 10:
            names += [f"cosmic_qci.{n}.{p}" for p in ("beta", "weight", "bias")]
    return sorted(names)


# ----------------------------------------------------------------------------- .pt2
BLOCKED_LOADER = textwrap.dedent(
    """
    import sys

    class BlockCosmic:
        def find_spec(self, name, path=None, target=None):
            if name == "cosmic_fx" or name.startswith("cosmic_fx."):
                raise ImportError("cosmic_fx is blocked in this process")

    sys.meta_path.insert(0, BlockCosmic())
    try:
        import cosmic_fx  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the import block does not work")

    import torch

    for pt2, expected in zip(sys.argv[1::2], sys.argv[2::2]):
        module = torch.export.load(pt2).module()
        cases = torch.load(expected, weights_only=True)
        for x, want in zip(cases["inputs"], cases["outputs"]):
            torch.testing.assert_close(module(x), want, rtol=1e-5, atol=1e-6)
        print(pt2, "ok", [tuple(x.shape) for x in cases["inputs"]])
    assert not any(m.startswith("cosmic_fx") for m in sys.modules)
    """
)


def test_pt2_runs_without_cosmic_fx_at_other_batch_sizes(tmp_path):
    args = []
    for name in THREE:
        tm, make_input = transformed(name)
        path = cosmic_fx.export(tm, make_input(4), tmp_path / f"{name}.pt2")
        assert path == tmp_path / f"{name}.pt2" and path.is_file()
        inputs = [make_input(b) for b in BATCHES]
        with torch.no_grad():
            outputs = [tm(x) for x in inputs]
        torch.save({"inputs": inputs, "outputs": outputs}, tmp_path / f"{name}.expected.pt")
        args += [str(path), str(tmp_path / f"{name}.expected.pt")]
    script = tmp_path / "load.py"
    script.write_text(BLOCKED_LOADER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"  # as in the rest of the suite (conftest)
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=180,
                          cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(" ok [") == len(THREE)


def test_load_program_matches_the_model_and_never_unpickles_unsafely(tmp_path, monkeypatch):
    tm, make_input = transformed("cnn")
    path = cosmic_fx.export(tm, make_input(4), tmp_path / "cnn.pt2")
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    program = load_program(path)
    assert calls and all(flag is True for flag in calls)
    x = make_input(7)
    with torch.no_grad():
        assert_close(program.module()(x), tm(x), rtol=1e-5, atol=1e-6)


def _rewrite_member(src, dst, suffix, data):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            zout.writestr(item, data if item.filename.endswith(suffix) else zin.read(item.filename))


def test_corrupt_pt2_files_get_clear_errors(tmp_path):
    tm, make_input = transformed("mlp")
    good = cosmic_fx.export(tm, make_input(4), tmp_path / "good.pt2")
    blob = good.read_bytes()
    (tmp_path / "truncated.pt2").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CorruptFileError, match=r"truncated\.pt2 is not a \.pt2 archive .*truncated or corrupt"):
        load_program(tmp_path / "truncated.pt2")
    (tmp_path / "text.pt2").write_text("hello")
    with pytest.raises(CorruptFileError, match="not a .pt2 archive"):
        load_program(tmp_path / "text.pt2")
    with pytest.raises(CorruptFileError, match="missing.pt2: no such file"):
        load_program(tmp_path / "missing.pt2")
    # flip bytes inside a weight: the zip checksum catches it
    with zipfile.ZipFile(good) as z:
        info = next(i for i in z.infolist() if "/weights/weight_" in i.filename and i.file_size > 100)
    damaged = bytearray(blob)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    damaged[start + 10 : start + 20] = bytes(10)
    (tmp_path / "flipped.pt2").write_bytes(bytes(damaged))
    with pytest.raises(CorruptFileError, match="fails its checksum"):
        load_program(tmp_path / "flipped.pt2")
    # a pickled Python object where sample inputs belong: refused before anything unpickles it
    buf = tmp_path / "obj.pt"
    torch.save(argparse.Namespace(payload=1), buf)
    _rewrite_member(good, tmp_path / "pickled.pt2", "sample_inputs/model.pt", buf.read_bytes())
    with pytest.raises(CorruptFileError, match="not plain tensor data.*refuses to unpickle"):
        load_program(tmp_path / "pickled.pt2")
    _rewrite_member(good, tmp_path / "badjson.pt2", "model_weights_config.json", b"{not json")
    with pytest.raises(CorruptFileError, match="model_weights_config.json is not valid JSON"):
        load_program(tmp_path / "badjson.pt2")


# ----------------------------------------------------------------------------- ONNX
@pytest.mark.parametrize("name", THREE)
def test_onnx_matches_torch_in_onnxruntime(name, tmp_path):
    pytest.importorskip("onnxscript")
    tm, make_input = transformed(name)
    path = cosmic_fx.export(tm, make_input(4), tmp_path / f"{name}.onnx", format="onnx")
    assert path.is_file() and not list(tmp_path.glob("*.data"))  # one self-contained file
    session = load_onnx(path)
    (inp,) = session.get_inputs()
    assert isinstance(inp.shape[0], str)  # a named, dynamic batch dimension
    for b in BATCHES:
        x = make_input(b)
        (got,) = session.run(None, {inp.name: x.numpy()})
        with torch.no_grad():
            assert_close(torch.from_numpy(got), tm(x), rtol=0, atol=1e-4)


def test_corrupt_onnx_gets_a_clear_error(tmp_path):
    pytest.importorskip("onnxruntime")
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(CorruptFileError, match=r"bad\.onnx is not a loadable ONNX model .*truncated or corrupt"):
        load_onnx(tmp_path / "bad.onnx")
    with pytest.raises(CorruptFileError, match="nope.onnx: no such file"):
        load_onnx(tmp_path / "nope.onnx")


# ----------------------------------------------------------------------------- adapters
def perturb_qcis(tm):
    """Stand-in for training: move every QCI parameter away from its initial value."""
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in tm.named_parameters():
            if "cosmic_qci." in name or ".qci." in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


def qci_state(tm):
    return {k: v for k, v in tm.state_dict().items() if "cosmic_qci." in k or ".qci." in k}


@pytest.mark.parametrize("name", [*THREE, "untraceable"])
def test_adapter_round_trip_on_a_fresh_base_model(name, tmp_path):
    factory, make_input, _ = MODELS[name]
    torch.manual_seed(0)
    base = factory()
    tm = cosmic_fx.transform(base, CFG).eval()
    perturb_qcis(tm)
    folder = cosmic_fx.export(tm, make_input(4), tmp_path / "adapter", format="adapter")
    assert sorted(os.listdir(folder)) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]

    from safetensors.torch import load_file

    saved = load_file(str(folder / ADAPTER_WEIGHTS))
    assert saved.keys() == qci_state(tm).keys()
    if name != "untraceable":
        assert sorted(saved) == qci_names(base)
    meta = json.loads((folder / ADAPTER_CONFIG).read_text())
    assert meta["config"] == CFG.to_options() and meta["format"] == "cosmic_fx.adapter"

    # a fresh base from the same factory with another seed: the adapter brings only the QCIs
    torch.manual_seed(1)
    fresh = factory()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.warns(UserWarning, match="base model's weights differ from those the adapter"):
        loaded = cosmic_fx.load_adapter(fresh, folder).eval()
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in before.items())  # base untouched
    torch.manual_seed(2)
    reference = cosmic_fx.transform(fresh, CFG).eval()  # independent: copy the QCIs by hand
    missing, unexpected = reference.load_state_dict(qci_state(tm), strict=False)
    assert not unexpected and all("qci" not in k for k in missing)
    x = make_input(6)
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x))
        assert not torch.allclose(loaded(x), tm(x))

    # the same base weights give back exactly the exported model
    torch.manual_seed(3)
    same = factory()
    same.load_state_dict(base.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = cosmic_fx.load_adapter(same, folder / ADAPTER_CONFIG).eval()
    with torch.no_grad():
        assert torch.equal(again(x), tm(x))


def test_adapter_loading_uses_no_pickle(tmp_path, monkeypatch):
    tm, make_input = transformed("mlp")
    folder = cosmic_fx.export(tm, make_input(4), tmp_path / "a", format="adapter")

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle was used")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    torch.manual_seed(0)
    base = MODELS["mlp"][0]()
    loaded = cosmic_fx.load_adapter(base, folder).eval()
    x = make_input(2)
    with torch.no_grad():
        assert torch.equal(loaded(x), tm(x))


def test_corrupt_or_mismatched_adapters_get_clear_errors(tmp_path):
    tm, make_input = transformed("cnn")
    folder = cosmic_fx.export(tm, make_input(4), tmp_path / "good", format="adapter")
    base = MODELS["cnn"][0]()

    def copy_with(name, config=None, weights=None):
        out = tmp_path / name
        out.mkdir()
        (out / ADAPTER_CONFIG).write_text(config if config is not None else (folder / ADAPTER_CONFIG).read_text())
        (out / ADAPTER_WEIGHTS).write_bytes(weights if weights is not None else (folder / ADAPTER_WEIGHTS).read_bytes())
        return out

    blob = (folder / ADAPTER_WEIGHTS).read_bytes()
    with pytest.raises(CorruptFileError, match="adapter_model.safetensors is not a valid safetensors file.*truncated"):
        cosmic_fx.load_adapter(base, copy_with("truncated", weights=blob[: len(blob) - 100]))
    with pytest.raises(CorruptFileError, match="not a valid safetensors file"):
        cosmic_fx.load_adapter(base, copy_with("garbage", weights=b"\xff" * 64))
    text = (folder / ADAPTER_CONFIG).read_text()
    with pytest.raises(CorruptFileError, match="adapter_config.json is not valid JSON.*truncated or corrupt"):
        cosmic_fx.load_adapter(base, copy_with("halfjson", config=text[: len(text) // 2]))
    meta = json.loads(text)
    with pytest.raises(CorruptFileError,
                       match='not a cosmic_fx adapter config \\(expected "format": "cosmic_fx.adapter"\\)'):
        cosmic_fx.load_adapter(base, copy_with("peft", config=json.dumps({**meta, "format": "peft"})))
    with pytest.raises(CorruptFileError, match="adapter format version 99; this cosmic_fx reads version 1"):
        cosmic_fx.load_adapter(base, copy_with("future", config=json.dumps({**meta, "format_version": 99})))
    with pytest.raises(CorruptFileError, match="holds an invalid config: CosmicConfig.csc must be one of"):
        cosmic_fx.load_adapter(base, copy_with("badcfg", config=json.dumps({**meta, "config": {"csc": "everywhere"}})))
    with pytest.raises(CorruptFileError, match="no such adapter directory"):
        cosmic_fx.load_adapter(base, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorruptFileError, match="no adapter_config.json there"):
        cosmic_fx.load_adapter(base, tmp_path / "empty")
    with pytest.raises(ValueError, match=r"does not fit DigitsMLP: it was exported for a DigitsCNN whose rewritten "
                                         r"sites are \['conv1', 'conv2', 'fc1'\]"):
        cosmic_fx.load_adapter(MODELS["mlp"][0](), folder)
    with pytest.raises(ValueError, match="adapter tensor cosmic_qci.fc1.weight has shape"):
        from cosmic_fx.models import DigitsCNN

        bigger = DigitsCNN()
        bigger.fc1 = nn.Linear(512, 65)
        bigger.head = nn.Linear(65, 10)
        cosmic_fx.load_adapter(bigger, folder)
    with pytest.raises(ValueError, match="needs the base model, not a transformed one"):
        cosmic_fx.load_adapter(tm, folder)


# ----------------------------------------------------------------------------- what cannot be exported
@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_unexportable_forward_names_the_line_and_a_fix(fmt, tmp_path):
    with pytest.raises(ExportError, match=r"(?s)cannot export Untraceable: .*conftest\.py:\d+ in forward: "
                                          r"`if h\.sum\(\) > 0:.*torch\.where.*torch\.export said: "
                                          r"GuardOnDataDependentSymNode"):
        cosmic_fx.export(Untraceable(), torch.rand(4, 8), tmp_path / f"u.{fmt}", format=fmt)
    assert not list(tmp_path.iterdir())


class FixedBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)

    def forward(self, x):
        return self.fc(x).reshape(4, 16)


def test_batch_problems_are_explained(tmp_path):
    with pytest.raises(ExportError, match="fixes the batch size to 4.*dynamic_batch=False"):
        cosmic_fx.export(FixedBatch(), torch.rand(4, 8), tmp_path / "f.pt2")
    path = cosmic_fx.export(FixedBatch(), torch.rand(4, 8), tmp_path / "f.pt2", dynamic_batch=False)
    assert load_program(path).module()(torch.rand(4, 8)).shape == (4, 16)
    with pytest.raises(ExportError, match="batch size 1 .*Use an example batch of 2 or more"):
        cosmic_fx.export(nn.Linear(8, 16), torch.rand(1, 8), tmp_path / "one.pt2")
    with pytest.raises(ValueError, match="format must be one of 'pt2', 'onnx', 'adapter'; got 'tflite'"):
        cosmic_fx.export(nn.Linear(8, 16), torch.rand(2, 8), tmp_path / "x", format="tflite")


def test_export_keeps_modes_and_accepts_compiled_and_transformed_models(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.5), nn.ReLU(), nn.Linear(32, 4)).train()
    tm = cosmic_fx.transform(model, CFG)
    path = cosmic_fx.export(torch.compile(tm), torch.rand(4, 8), tmp_path / "m.pt2")
    assert tm.training and all(m.training for m in model.modules())
    x = torch.rand(6, 8)
    exported = load_program(path).module()
    with torch.no_grad():
        assert_close(exported(x), tm.eval()(x), rtol=1e-5, atol=1e-6)  # dropout off: exported in eval mode
        assert_close(exported(x), exported(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="already transformed with another config"):
        cosmic_fx.export(tm, torch.rand(4, 8), tmp_path / "n.pt2", config=CosmicConfig.seed())
    # an untransformed model is transformed with the given config first
    folder = cosmic_fx.export(model, torch.rand(4, 8), tmp_path / "ad", format="adapter", config=CFG)
    assert json.loads((folder / ADAPTER_CONFIG).read_text())["rewritten"] == ["0"]
