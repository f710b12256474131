"""Bad input found unclear in issue 9: explain on a meta-device model, export with inputs of the wrong
shape, and adapter weights with flipped bits."""

import json
import struct

import pytest
import torch
from torch import nn

import cosmic_fx
from cosmic_fx import CosmicConfig
from cosmic_fx.export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CorruptFileError, ExportError
from cosmic_fx.models import DigitsCNN, DigitsMLP


# ----------------------------------------------------------------------------- explain on the meta device
def test_explain_on_a_meta_model_asks_for_real_weights():
    with torch.device("meta"):
        model = DigitsMLP()
    with pytest.raises(ValueError, match=r"explain needs real weights, but DigitsMLP has 6 parameter\(s\)/buffer\(s\) "
                                         r"on the meta device \(0\.weight, 0\.bias, 2\.weight and 3 more\).*"
                                         r"to_empty\(device='cpu'\).*load_state_dict\(state_dict, assign=True\)"):
        cosmic_fx.explain(model, torch.rand(4, 64))
    # the advice works: materialise, initialise, explain
    model.to_empty(device="cpu")
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    report = cosmic_fx.explain(model, torch.rand(4, 64))
    assert [s.name for s in report.sites] == ["0", "2", "4"] and report.e_out is not None


def test_explain_on_meta_inputs_asks_for_real_ones():
    with pytest.raises(ValueError, match=r"needs real example inputs, not tensors on the meta device"):
        cosmic_fx.explain(DigitsMLP(), torch.empty(4, 64, device="meta"))


# ----------------------------------------------------------------------------- export with inputs that do not fit
@pytest.mark.parametrize(("model", "x", "expects"), [
    (DigitsCNN(), torch.rand(4, 3, 8, 8),
     r"input 0: shape \(4, 3, 8, 8\) float32.*first layer conv1 is Conv2d\(1, 16"
     r".*expects inputs of shape \(N, 1, H, W\)"),
    (DigitsMLP(), torch.rand(4, 32),
     r"input 0: shape \(4, 32\) float32.*first layer 0 is Linear\(in_features=64"
     r".*expects inputs of shape \(\.\.\., 64\)"),
    (nn.Sequential(nn.Embedding(10, 16), nn.Linear(16, 16)), torch.rand(4, 5),
     r"input 0: shape \(4, 5\) float32.*first layer 0 is Embedding\(10, 16\): it expects integer token ids below 10"),
])
def test_export_names_an_input_that_does_not_fit(model, x, expects, tmp_path):
    with pytest.raises(ExportError,
                       match=r"cannot export \w+: it does not run on the example inputs \(" + expects) as info:
        cosmic_fx.export(model, x, tmp_path / "m.pt2")
    assert "could not trace" not in str(info.value) and "<string>" not in str(info.value)
    assert not (tmp_path / "m.pt2").exists()


class _ReadsAMissingAttribute(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)

    def forward(self, x):
        return self.fc(x) * self.fc.scale  # no such attribute: a bug of the forward, not of the inputs


def test_export_of_a_forward_that_fails_blames_the_forward_not_the_inputs(tmp_path):
    with pytest.raises(ExportError, match=r"it does not run on the example inputs \(input 0: shape \(4, 8\) float32\) "
                                          r"even without torch\.export.*AttributeError: '\w+' object has no "
                                          r"attribute 'scale' at .*test_bad_input\.py:\d+ in forward.*"
                                          r"Make the forward run on these inputs first") as info:
        cosmic_fx.export(_ReadsAMissingAttribute(), torch.rand(4, 8), tmp_path / "m.pt2")
    assert "shape and dtype the model takes" not in str(info.value)


# ----------------------------------------------------------------------------- adapter checksum
def _adapter(tmp_path):
    torch.manual_seed(0)
    base = DigitsMLP()
    tm = cosmic_fx.transform(base, CosmicConfig(csc="none")).eval()
    with torch.no_grad():
        for name, p in tm.named_parameters():
            if "cosmic_qci." in name or ".qci." in name:
                p.add_(0.05 * torch.randn_like(p))
    folder = cosmic_fx.export(tm, torch.rand(4, 64), tmp_path / "adapter", format="adapter")
    return base, tm, folder


def _flip_a_bit_in_the_data(file):
    blob = bytearray(file.read_bytes())
    (header,) = struct.unpack("<Q", blob[:8])  # safetensors: u64 header length, JSON header, then raw data
    data_start = 8 + header
    blob[data_start + (len(blob) - data_start) // 2] ^= 0x40  # an exponent bit of one float
    file.write_bytes(bytes(blob))


def test_adapter_stores_a_checksum_and_a_flipped_bit_fails_it(tmp_path):
    base, tm, folder = _adapter(tmp_path)
    meta = json.loads((folder / ADAPTER_CONFIG).read_text())
    assert meta["tensors_sha256"].startswith("sha256:") and len(meta["tensors_sha256"]) == len("sha256:") + 64
    x = torch.rand(5, 64)
    with torch.no_grad():
        assert torch.equal(cosmic_fx.load_adapter(base, folder).eval()(x), tm(x))  # intact: loads, no warning

    _flip_a_bit_in_the_data(folder / ADAPTER_WEIGHTS)
    with pytest.raises(CorruptFileError, match=rf"{ADAPTER_WEIGHTS} fails its checksum: its tensors' sha256 is "
                                               r"sha256:[0-9a-f]{64}, but adapter_config\.json recorded "
                                               r"sha256:[0-9a-f]{64} when the adapter was exported.*"
                                               r"copy it again from its source or export the adapter again"):
        cosmic_fx.load_adapter(base, folder)


def test_adapter_without_a_checksum_still_loads_with_a_warning(tmp_path):
    base, tm, folder = _adapter(tmp_path)
    meta = json.loads((folder / ADAPTER_CONFIG).read_text())
    del meta["tensors_sha256"]  # as written before the field existed
    (folder / ADAPTER_CONFIG).write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match=r"has no 'tensors_sha256' \(it was exported by an older cosmic_fx\).*"
                                         r"cannot be checked; export the adapter again"):
        loaded = cosmic_fx.load_adapter(base, folder).eval()
    x = torch.rand(5, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), tm(x))
