"""Typed configs: the library's input, written to and read back from flagfile lines."""

import dataclasses
import json

import pytest

from retina_tf import config
from retina_tf.errors import ConfigError

CLASSES = [config.TrainConfig, config.EvalConfig, config.PredictConfig, config.MAEConfig,
           config.RipPatchConfig, config.RipPretrainConfig, config.ErrorMapConfig]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_flag_lines_round_trip_every_config(cls):
    assert config.from_flag_lines(cls, config.to_flag_lines(cls())) == cls()
    # every field changed away from its default survives the round trip too
    changed = {}
    for f in dataclasses.fields(cls):
        value = getattr(cls(), f.name)
        if isinstance(value, bool):
            changed[f.name] = not value
        elif isinstance(value, (int, float)) and f.name != "seed":
            changed[f.name] = type(value)(value + 3)
        elif f.name in ("eval_scales",):
            changed[f.name] = (0.5, 1.0)
        elif f.name == "model_config":
            changed[f.name] = {"depth": 3, "scales": [0.5, 1.0]}
        elif value is None and "dir" in f.name:
            changed[f.name] = "some/folder"
    cfg = cls(**changed)
    assert config.from_flag_lines(cls, config.to_flag_lines(cfg)) == cfg


def test_configs_are_frozen_and_typed():
    cfg = config.TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3
    assert config.from_flag_lines(config.TrainConfig, "--noflip\n--preprocess=none\n# c\n") == \
        config.TrainConfig(flip=False, preprocess=("none",))
    with pytest.raises(ConfigError, match="--epochz: not a setting of TrainConfig"):
        config.from_flag_lines(config.TrainConfig, "--epochz=3")
    with pytest.raises(ConfigError, match="--epochs=three"):
        config.from_flag_lines(config.TrainConfig, "--epochs=three")


def test_model_config_from_json_text_or_file(tmp_path):
    assert config.read_model_config('{"depth": 3}') == {"depth": 3}
    path = tmp_path / "unet.json"
    path.write_text(json.dumps({"base_filters": 8}))
    assert config.read_model_config(str(path)) == {"base_filters": 8}
    with pytest.raises(ConfigError, match="no such file"):
        config.read_model_config(str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        config.read_model_config("[1, 2]")
    with pytest.raises(ConfigError, match="is not valid"):
        config.read_model_config("{depth: 3}")


def test_from_run_needs_a_run_folder(tmp_path):
    with pytest.raises(ConfigError, match="flags.txt does not exist"):
        config.from_run(tmp_path)
    (tmp_path / "flags.txt").write_text("--model=mae\n--mask_ratio=0.5\n--epochs=2\n")
    assert config.from_run(tmp_path) == config.MAEConfig(mask_ratio=0.5, epochs=2)
