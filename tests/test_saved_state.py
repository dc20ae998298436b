"""Saved configs and sweep state carry a version; a key this version does not know is an error that names
it; a sweep saved before versions existed (``fixtures/sweep-v1.json``, written by the code of 2026-12-02)
still loads for a resume."""

import json

import pytest
from helpers import FIXTURES

from raysys.config import CONFIG_VERSION, PretrainConfig, make_config
from raysys.distributed.sweep import SweepSpec, trial_config
from raysys.errors import ConfigError

SAVED_SWEEP = FIXTURES / "sweep-v1.json"


def test_config_round_trip_carries_the_version():
    cfg = make_config("smoke", seed=3)
    saved = json.loads(json.dumps(cfg.to_dict()))
    assert saved["version"] == CONFIG_VERSION
    assert PretrainConfig.from_dict(saved) == cfg


def test_unknown_or_newer_config_is_refused_by_name():
    saved = make_config("smoke").to_dict()
    with pytest.raises(ConfigError, match="unknown keys \\['warp_factor'\\]"):
        PretrainConfig.from_dict({**saved, "warp_factor": 9})
    with pytest.raises(ConfigError, match="newer raysys"):
        PretrainConfig.from_dict({**saved, "version": CONFIG_VERSION + 1})


def test_config_is_frozen_and_validation_returns_the_config_to_run(tmp_path):
    cfg = make_config("smoke", storage=f"file://{tmp_path}/store/")
    with pytest.raises(AttributeError):
        cfg.epochs = 9
    checked = cfg.validate()
    assert cfg.storage == f"file://{tmp_path}/store/" and checked.storage != cfg.storage
    assert checked.replace(storage=cfg.storage) == cfg


def test_sweep_saved_before_versions_still_loads():
    saved = json.loads(SAVED_SWEEP.read_text())
    assert "version" not in saved and "version" not in saved["base"]
    spec = SweepSpec.from_dict(saved)
    configs = [trial_config(spec, {**params, "seed": 0}).validate() for params in spec.grid()]
    assert [c.pair_rule for c in configs] == ["instance", "cluster", "instance"]
    assert {c.preset for c in configs} == {"smoke"}


def test_sweep_state_with_unknown_keys_is_refused_by_name():
    saved = json.loads(SAVED_SWEEP.read_text())
    with pytest.raises(ConfigError, match="unknown keys \\['speed'\\]"):
        SweepSpec.from_dict({**saved, "speed": "ludicrous"})
    with pytest.raises(ConfigError, match="unknown keys \\['warp_factor'\\]"):
        SweepSpec.from_dict({**saved, "base": {**saved["base"], "warp_factor": 9}})
