"""The training configuration (SAM3DSegmentLib.train.config, validated with pydantic): the shipped configs load
unchanged, every typo or wrong type is one clear message naming the key path, what it takes and the nearest
known key, and the conversions a hand-written file needs still work. No torch needed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from SAM3DSegmentLib.train.config import (ConfigError, TrainConfig, apply_overrides, config_from_dict,
                                          config_to_dict, load_config)

REPO = Path(__file__).resolve().parents[1]


def _leaves(d, prefix=()):
    for k, v in d.items():
        if isinstance(v, dict) and k != "arch_overrides":
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_config_loads_with_its_values_and_round_trips(path):
    cfg = load_config(str(path))
    dumped = config_to_dict(cfg)
    for keys, value in _leaves(json.loads(path.read_text(encoding="utf-8"))):
        got = dumped
        for k in keys:
            got = got[k]
        assert got == value and type(got) is type(value) or (isinstance(value, int) and float(value) == got), keys
    assert config_from_dict(dumped) == cfg
    assert json.loads(json.dumps(dumped)) == dumped  # what --print-config and the checkpoints store


def test_typos_name_the_nearest_key_at_every_level(tmp_path):
    def err(d):
        with pytest.raises(ConfigError) as info:
            config_from_dict(d)
        return str(info.value)

    msg = err({"optimizer": {"lr": 1e-3}})
    assert "unknown config key(s) ['optimizer'] (did you mean 'optim'?); known keys under the top level: [" in msg
    assert "unknown config key(s) ['loop.epoch'] (did you mean 'loop.epochs'?); known keys under loop:" in \
        err({"loop": {"epoch": 3}})
    msg = err({"data": {"rots": ["x"], "zzz": 1}})
    assert "['data.rots', 'data.zzz'] (did you mean 'data.roots'?)" in msg
    with pytest.raises(ConfigError, match=r"\['val.early_stoping_patience'\] \(did you mean "
                                          r"'val.early_stopping_patience'\?\)"):
        apply_overrides(TrainConfig(), ["val.early_stoping_patience=3"])
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"schedule": {"nmae": "cosine"}}))
    with pytest.raises(ConfigError, match=rf"invalid training config \({path}\): .*'schedule.nmae'.*"
                                          r"did you mean 'schedule.name'"):
        load_config(str(path))


def test_wrong_types_and_values_name_the_key_path_and_what_it_takes():
    cases = [({"loop": {"epochs": "abc"}}, "loop.epochs must be an integer, got 'abc'"),
             ({"loop": {"epochs": 2.5}}, "loop.epochs must be an integer, got 2.5"),
             ({"optim": {"lr": True}}, "optim.lr must be a number, got True"),
             ({"data": {"flip": 2}}, "data.flip must be true or false, got 2"),
             ({"data": {"roots": ["a", 3]}}, "data.roots[1] must be a string, got 3"),
             ({"optim": 3}, "optim must be an object, got 3"),
             ({"loop": {"click_mode": "nearest"}}, "loop.click_mode must be one of 'random', 'deepest'; got 'nearest'"),
             ({"mode": "lora"}, "mode must be one of 'full', 'decoder', 'adapter3d', 'dualpath'; got 'lora'"),
             ({"data": {"val_fraction": 1.0}}, "data.val_fraction must be < 1.0, got 1.0"),
             ({"data": {"ct_clamp": [-1000]}}, "data.ct_clamp must be [lo, hi] or [], got [-1000]"),
             ({"loop": {"mask_only_range": [5, 2]}}, "loop.mask_only_range must be [lo, hi] with lo <= hi"),
             ({"adapter": {"kernel_size": 4}}, "adapter.kernel_size must be odd and >= 1, got 4"),
             ({"log": {"tensorboard": "sometimes"}}, "log.tensorboard must be one of 'auto', 'true', 'false'")]
    for d, needle in cases:
        with pytest.raises(ConfigError) as info:
            config_from_dict(d)
        assert needle in str(info.value), (d, str(info.value))
    # every problem at once, not one per run
    with pytest.raises(ConfigError, match=r"loop.epochs must be >= 1, got 0; loop.batch_size must be an integer"):
        config_from_dict({"loop": {"epochs": 0, "batch_size": True}})
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides(TrainConfig(), ["loop.epochs"])


def test_the_conversions_a_hand_written_file_needs():
    cfg = config_from_dict({"loop": {"epochs": 3.0, "mask_only_range": (1, 2)}, "data": {"roots": "one/folder",
                            "flip": "no", "val_cases": "case7"}, "log": {"tensorboard": True},
                            "schedule": {"milestones": [10.0, 20]}})
    assert cfg.loop.epochs == 3 and type(cfg.loop.epochs) is int and cfg.loop.mask_only_range == [1, 2]
    assert cfg.data.roots == ["one/folder"] and cfg.data.flip is False and cfg.data.val_cases == ["case7"]
    assert cfg.log.tensorboard == "true" and cfg.schedule.milestones == [10, 20]
    cfg = apply_overrides(cfg, ["optim.lr=1e-4", "log.tensorboard=false", "model.arch_overrides.encoder_depth=2",
                                "output_dir=runs/x", "data.roots=[\"a\",\"b\"]"])
    assert cfg.optim.lr == 1e-4 and cfg.log.tensorboard == "false" and cfg.model.arch_overrides == {"encoder_depth": 2}
    assert cfg.output_dir == "runs/x" and cfg.data.roots == ["a", "b"]
    assert config_to_dict(TrainConfig()) == config_to_dict(config_from_dict({}))


def test_errors_are_one_line_and_the_system_check_refuses_a_bad_amp_before_running(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"loop": {"epochs": 2, "batch_size": 0}, "optimizer": {}}))
    with pytest.raises(ConfigError) as info:
        load_config(str(path), ["optim.lrr=1"])
    msg = str(info.value)
    assert "\n" not in msg and "did you mean 'optim'" in msg and "did you mean 'optim.lr'" in msg
    assert "loop.batch_size must be >= 1, got 0" in msg
    from SAM3DSegmentLib.train.loop import system_check

    with pytest.raises(ConfigError, match="amp must be one of 'auto', 'off', 'bf16', 'fp16'; got 'bf15'"):
        system_check("cpu", "bf15")
