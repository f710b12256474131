import dataclasses

import pytest

from cosmic_fx import CCEMode, CDGMode, CosmicConfig, CSCPlacement, Lowering, QCIInit


def test_presets():
    default, seed, off = CosmicConfig(), CosmicConfig.seed(), CosmicConfig.off()
    assert (default.cdg, default.cce, default.qci_init) == (CDGMode.CALIBRATED, CCEMode.RELATIVE, QCIInit.IDENTITY)
    expected = (CDGMode.SEED, CCEMode.SEED, QCIInit.SEED, CSCPlacement.OUTPUT)
    assert (seed.cdg, seed.cce, seed.qci_init, seed.csc) == expected
    assert not off.qci and off.csc is CSCPlacement.NONE and not off.hooks_enabled
    assert CosmicConfig.preset("seed", csc_alpha=0.3) == CosmicConfig.seed(csc_alpha=0.3)
    assert hash(default) == hash(CosmicConfig())  # hashable: one hook runtime per distinct config


def test_options_round_trip():
    cfg = CosmicConfig(csc="sites", targets=["fc.*"], lower="aot_eager")
    assert CosmicConfig.from_options(cfg.to_options()) == cfg
    assert CosmicConfig.from_options({"preset": "seed", "csc_alpha": 0.3}) == CosmicConfig.seed(csc_alpha=0.3)
    assert CosmicConfig.from_options({"config": cfg, "csc_alpha": 0.2}) == dataclasses.replace(cfg, csc_alpha=0.2)
    assert CosmicConfig.from_options(None) == CosmicConfig()
    assert CosmicConfig(lower="AOT_EAGER").lower is Lowering.AOT_EAGER


@pytest.mark.parametrize("options,match", [
    ({"bogus": 1}, r"unknown cosmic option\(s\) \['bogus'\]; valid keys: config, preset, cce, "),
    ({"preset": "turbo"}, r"unknown cosmic preset 'turbo'; valid presets: default, fast, seed, off"),
    ({"cdg": "suffix"}, r"CosmicConfig.cdg must be one of 'off', 'seed', 'calibrated', 'prefix'; got 'suffix'"),
    ({"cdg_prefix_signal": "loss"},
     r"CosmicConfig.cdg_prefix_signal must be one of 'grad', 'efficiency', 'drift'; got 'loss'"),
    ({"cdg_prefix_window": 0}, r"CosmicConfig.cdg_prefix_window must be an int >= 1; got 0"),
    ({"cdg_prefix_threshold": 0}, r"CosmicConfig.cdg_prefix_threshold must be > 0"),
    ({"cdg_prefix_threshold": -0.1}, r"CosmicConfig.cdg_prefix_threshold must be finite and in \[0.0, inf\]; got -0.1"),
    ({"cdg_prefix_max": 1.5}, r"CosmicConfig.cdg_prefix_max must be finite and in \[0.0, 1.0\]; got 1.5"),
    ({"cdg_prefix_max": 0.0}, r"CosmicConfig.cdg_prefix_max must be > 0"),
    ({"csc": "everywhere"}, r"CosmicConfig.csc must be one of 'output', 'sites', 'none'; got 'everywhere'"),
    ({"csc_alpha": float("nan")}, r"CosmicConfig.csc_alpha must be finite and in \[0.0, inf\]; got nan"),
    ({"csc_alpha": -0.5}, r"CosmicConfig.csc_alpha must be finite and in \[0.0, inf\]; got -0.5"),
    ({"csc_alpha": "0.5"}, r"CosmicConfig.csc_alpha must be a number; got '0.5'"),
    ({"eps": 0.0}, r"CosmicConfig.eps must be > 0"),
    ({"eps": 0.5}, r"CosmicConfig.eps must be finite and in \[0.0, 0.01\]; got 0.5"),
    ({"min_width": -1}, r"CosmicConfig.min_width must be an int >= 0; got -1"),
    ({"cdg_interval": 2.5}, r"CosmicConfig.cdg_interval must be an int >= 1; got 2.5"),
    ({"qci": "yes"}, r"CosmicConfig.qci must be a bool; got 'yes'"),
    ({"targets": ["fc("]}, r"CosmicConfig.targets: 'fc\(' is not a valid regex"),
    ({"targets": [1]}, r"CosmicConfig.targets must be a list of regex strings; got \[1\]"),
    ({"cce_min": 1.5}, r"needs 0 < cce_min <= 1 <= cce_max"),
    ({"cdg_max_frozen": 1.5}, r"CosmicConfig.cdg_max_frozen must be finite and in \[0.0, 1.0\]; got 1.5"),
])
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        CosmicConfig.from_options(options)


def test_fast_preset_from_options_and_constructor():
    fast = CosmicConfig.fast()
    assert CosmicConfig.from_options({"preset": "fast"}) == fast
    from_options = CosmicConfig.from_options({"preset": "fast", "cdg_prefix_window": 7})
    assert from_options == CosmicConfig.fast(cdg_prefix_window=7)
    assert (fast.cdg.value, fast.qci_form.value, fast.csc.value) == ("prefix", "diagonal", "none")
    assert fast != CosmicConfig() and CosmicConfig.from_options(fast.to_options()) == fast


def test_wrong_container_types():
    with pytest.raises(TypeError, match="cosmic backend options must be a dict or a CosmicConfig; got list"):
        CosmicConfig.from_options([("csc", "none")])
    with pytest.raises(ValueError, match="cosmic options take 'config' or 'preset', not both"):
        CosmicConfig.from_options({"config": CosmicConfig(), "preset": "seed"})
    with pytest.raises(TypeError, match="cosmic option 'config' must be a CosmicConfig; got dict"):
        CosmicConfig.from_options({"config": {}})
