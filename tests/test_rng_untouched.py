"""cosmic_fx.transform leaves the global RNG as it found it (issue 16 item 2): creating QCIs drew from
it even at identity init, so a dropout model's first losses after the transform differed from a plain
run with the same seed. A QCI's initial values come from a generator of its own (cosmic_fx.qci.qci_seed)."""

import pytest
import torch
from torch import nn

import cosmic_fx
from cosmic_fx import CosmicConfig, QuantumClassicalInterface
from cosmic_fx.qci import qci_seed


class Traced(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(8, 600), nn.Dropout(0.3), nn.Linear(600, 5)

    def forward(self, x):
        return self.fc2(self.drop(self.fc1(x).relu()))


class Untraceable(Traced):
    """Data-dependent control flow: transform takes the module-swap path."""

    def forward(self, x):
        h = self.fc1(x).relu()
        if h.sum() > 0:
            h = self.drop(h)
        return self.fc2(h)


PRESETS = {
    "default": CosmicConfig(),
    "seed": CosmicConfig.seed(),
    "fast": CosmicConfig.fast(qci=True),  # the preset has no QCI since 2026-12-04: its wide-site form, put back
    "off": CosmicConfig.off(),
    "lowrank": CosmicConfig(qci_form="lowrank", qci_init="seed"),
    "diagonal": CosmicConfig(qci_form="diagonal"),
}


def rng_states():
    states = [torch.get_rng_state()]
    if torch.cuda.is_available():
        states += torch.cuda.get_rng_state_all()
    return states


@pytest.mark.parametrize("model_cls", [Traced, Untraceable], ids=["traced", "module_swap"])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_transform_and_compile_leave_the_rng_state_as_they_found_it(model_cls, preset):
    torch.manual_seed(0)
    model = model_cls()
    before = rng_states()
    tm = cosmic_fx.transform(model, PRESETS[preset])
    expected = "symbolic_trace" if model_cls is Traced else "module_swap"
    assert cosmic_fx.transform_info(tm).path == expected
    if preset != "off":
        assert any(isinstance(m, QuantumClassicalInterface) for m in tm.modules())
    cosmic_fx.compile(model, PRESETS[preset].replace(lower="aot_eager"))
    after = rng_states()
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize("model_cls", [Traced, Untraceable], ids=["traced", "module_swap"])
def test_a_dropout_model_trains_as_a_plain_run_with_the_same_seed(model_cls):
    def losses(transform: bool) -> list[float]:
        torch.manual_seed(0)
        model = model_cls()
        if transform:  # identity QCI, no CSC, no CDG/CCE: computes what the model does
            model = cosmic_fx.transform(model, CosmicConfig.off(qci=True))
            model.cosmic_qci.requires_grad_(False)  # and keeps doing so while the model trains
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        data = torch.Generator().manual_seed(1)
        out = []
        for _ in range(3):
            x, y = torch.randn(16, 8, generator=data), torch.randint(0, 5, (16,), generator=data)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.item())
        return out

    assert losses(transform=True) == losses(transform=False)


def test_seed_init_qcis_are_deterministic_per_seed_and_site():
    def qci_values(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        tm = cosmic_fx.transform(Traced(), CosmicConfig.seed())
        return {k: v.clone() for k, v in tm.state_dict().items() if k.startswith("cosmic_qci.")}

    a, b, c = qci_values(0), qci_values(0), qci_values(1)
    assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a if k.endswith("weight"))
    torch.manual_seed(0)
    assert qci_seed("fc1") != qci_seed("fc2")
