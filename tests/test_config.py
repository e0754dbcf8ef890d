"""Typed configs: the library's input, written to and read back from flagfile lines."""

import dataclasses
import json
import re

import numpy as np
import pytest
from absl import flags

from retina_tf import config
from retina_tf.errors import ConfigError
from retina_tf.flags import parse_config
from retina_tf.training import model_kwargs

CLASSES = [config.TrainConfig, config.EvalConfig, config.PredictConfig, config.MAEConfig,
           config.RipPatchConfig, config.RipPretrainConfig, config.ErrorMapConfig]


def _takes(cls, name, value) -> bool:
    try:
        cls(**{name: value})
    except ConfigError:
        return False
    return True


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
            # another value the field takes (a probability under 1, a tile over 128 px)
            changed[f.name] = next(v for v in (type(value)(value + 3), value / 2,
                                               type(value)(value + 200))
                                   if _takes(cls, f.name, v))
        elif f.name in ("eval_scales",):
            changed[f.name] = (0.5, 1.0)
        elif f.name == "model_config":
            changed[f.name] = {"depth": 3, "scales": [0.5, 1.0]}
        elif value is None and "dir" in f.name:
            changed[f.name] = "some/folder"
    cfg = cls(**changed)
    assert config.from_flag_lines(cls, config.to_flag_lines(cfg)) == cfg


def test_flag_lines_round_trip_none_empty_and_union_values():
    """A None that is not the default was dropped (rip_absent_fraction: "absent whenever not
    present" came back as 0.0); "0.5" for a str | float field is the number; an empty text or
    tuple is None, as its flag reads."""
    for cfg in (config.RipPatchConfig(rip_absent_fraction=None),
                config.EvalConfig(inference_scale=0.5), config.EvalConfig(eval_scales=()),
                config.TrainConfig(dataset="", data_dir="")):
        assert config.from_flag_lines(type(cfg), config.to_flag_lines(cfg)) == cfg
    assert "--rip_absent_fraction=\n" in config.to_flag_lines(
        config.RipPatchConfig(rip_absent_fraction=None))
    assert config.EvalConfig(inference_scale="0.5").inference_scale == 0.5
    assert config.EvalConfig(inference_scale="auto").inference_scale == "auto"
    assert config.EvalConfig(eval_scales=()).eval_scales is None
    assert config.TrainConfig(dataset="").dataset is None


def test_configs_are_frozen_and_typed():
    cfg = config.TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3
    settings = {"depth": 3, "scales": [0.5, 1.0]}
    cfg = config.TrainConfig(model_config=settings)
    settings["depth"], settings["scales"][0] = 9, 2.0  # the caller's dict, not the config's
    assert cfg.model_config == {"depth": 3, "scales": [0.5, 1.0]}
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


# --- the Python API refuses what the commands refuse -------------------------------------------

@pytest.mark.parametrize("fields,message", [
    ({"epochs": 0}, "TrainConfig: epochs=0: must be >= 1"),
    ({"learning_rate": -1.0}, "learning_rate=-1.0: must be > 0"),
    ({"batch_size": 0}, "batch_size=0: must be >= 1"),
    ({"mode": "whole_img"}, "mode='whole_img': must be one of patch, whole"),
    ({"patch_size": 48.0}, "patch_size=48.0: must be int, not float"),
    ({"epochs": "three"}, "--epochs=three"),
    ({"flip": 1}, "flip=1: must be bool"),
    ({"scale_range": (1.25, 0.8)}, "LO <= HI"),
    ({"dataset": "drive", "label_file_path": "my/training.txt"},
     "label_file_path and dataset both say which images to use"),
    ({"loss": "dice:0"}, "--loss=dice:0: loss spec 'dice:0' weighs every term 0"),
    ({"loss": "dcie:1"}, "--loss=dcie:1: unknown loss term 'dcie'"),
    ({"choose_tta": True, "val_images": 0}, "--choose_tta: chooses on the held-out training "
                                             "images, and --val_images=0 holds none out"),
    ({"mode": "whole", "scale_range": (0.8, 1.25)}, "--scale_range: resizes patches; "
                                                     "--mode=whole trains on whole images"),
    ({"mixed_patch_sizes": (24, 48), "scale_range": (0.8, 1.25)},
     "--mixed_patch_sizes and --scale_range both change the patch scale"),
    ({"dataset_weights": (2.0, 0.0)}, "dataset_weights=(2.0, 0.0): must be positive numbers"),
    ({"dataset": "drive", "extra_data": ("stare:data/STARE:all",), "dataset_weights": (2, 1, 1)},
     "--dataset_weights=2,1,1: 3 weight(s) for 2 set(s); give one per set, --dataset first"),
    ({"extra_data": ("stare:data/STARE:all",), "dataset_weights": (2, 1)},
     "--dataset_weights=2,1: 2 weight(s) for 1 set(s)"),
    ({"dataset": "drive", "extra_data": ("stare:data/STARE:all",), "dataset_weights": (2, 1),
      "balance_datasets": False}, "which --nobalance_datasets turns off"),
])
def test_a_config_refuses_what_its_flag_refuses(fields, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.TrainConfig(**fields)


def test_a_config_reads_values_as_their_flags_do(tmp_path):
    cfg = config.TrainConfig(epochs="3", model_config='{"base_filters": 8}', data_dir=tmp_path,
                             preprocess="clahe,gamma",
                             scale_range=np.array([0.8, 1.25]), batch_size=np.int64(4))
    assert cfg.epochs == 3 and cfg.model_config == {"base_filters": 8}
    assert config.TrainConfig(mixed_patch_sizes=[64, 128]).mixed_patch_sizes == (64, 128)
    assert cfg.data_dir == str(tmp_path)
    assert cfg.preprocess == ("clahe", "gamma") and cfg.scale_range == (0.8, 1.25)
    assert type(cfg.batch_size) is int and type(cfg.scale_range[0]) is float
    # the same value through the flag and through the config: the same words
    with pytest.raises(ConfigError, match="threshold=1.5: must be between 0 and 1"):
        config.EvalConfig(threshold=1.5)
    with pytest.raises(flags.IllegalFlagValueError, match="must be between 0 and 1"):
        parse_config("evaluate", ["--threshold=1.5"])
    with pytest.raises(flags.IllegalFlagValueError, match="LO <= HI"):
        parse_config("train", ["--scale_range=1.25,0.8"])
    # a factor as the number it is (InferenceConfig's docs: "a factor (e.g. 2)"), its text too
    assert config.PredictConfig(inference_scale=2).inference_scale == 2.0
    assert config.EvalConfig(inference_scale="2").inference_scale == 2.0
    with pytest.raises(ConfigError, match="inference_scale=True: must be float or str, not bool"):
        config.EvalConfig(inference_scale=True)
    # a factor past any camera's (100 for 1.0 segmented a 200 px image at 19841 px)
    with pytest.raises(ConfigError, match="inference_scale=100.0: must be .* up to 10"):
        config.EvalConfig(inference_scale=100)
    with pytest.raises(flags.IllegalFlagValueError, match="positive factor up to 10"):
        parse_config("predict", ["--inference_scale=100"])
    assert config.PredictConfig(inference_scale="10").inference_scale == 10.0


def test_a_model_setting_given_twice_must_agree():
    with pytest.raises(ConfigError, match=re.escape(
            "--depth=3 and --model_config's depth=2 disagree; give it once")):
        parse_config("train", ["--depth=3", '--model_config={"depth": 2}'])
    assert parse_config("train", ["--depth=2", '--model_config={"depth": 2}']
                        ).model_config["depth"] == 2  # the same value twice is fine
    with pytest.raises(ConfigError, match=re.escape(
            "--model_config: input_channels=3, but the data give 1")):
        model_kwargs(config.TrainConfig(model_config={"input_channels": 3}), 1, 1)


def test_a_command_given_another_config_says_which_it_takes():
    """train(EvalConfig(...)) and train({...}) failed on a missing attribute."""
    import retina_tf
    with pytest.raises(ConfigError, match=r"^train\(\) expects a config of type TrainConfig, "
                                          r"got EvalConfig$"):
        retina_tf.train(config.EvalConfig(model="unet"))
    with pytest.raises(ConfigError, match=r"got dict: retina_tf\.TrainConfig\(\*\*settings\)"):
        retina_tf.train({"model": "unet"})
    for function, cfg in ((retina_tf.evaluate, config.PredictConfig(input="x")),
                          (retina_tf.predict, config.EvalConfig()),
                          (retina_tf.pretrain_mae, config.TrainConfig()),
                          (retina_tf.pretrain_rip, config.MAEConfig())):
        with pytest.raises(ConfigError, match=rf"^{function.__name__}\(\) expects"):
            function(cfg)


def test_a_folder_flag_given_a_file_says_so(tmp_path):
    """It failed later as "cannot write .../x.npy: File exists" or "no such folder"."""
    from retina_tf.config import EvalConfig, TrainConfig
    afile = tmp_path / "afile"
    afile.write_text("")
    for cls, name in ((TrainConfig, "cache_dir"), (TrainConfig, "logdir"),
                      (TrainConfig, "data_dir"), (EvalConfig, "output_dir")):
        with pytest.raises(ConfigError, match=rf"--{name}={afile} is a file, not a folder"):
            cls(**{name: str(afile)})
    TrainConfig(cache_dir=str(tmp_path), logdir=str(tmp_path / "new"))  # folders, or to be


def test_a_home_folder_after_the_equals_sign_is_expanded(monkeypatch, tmp_path):
    """The shell leaves ``--output_dir=~/out`` as it is: a folder named ~ was made."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = parse_config("predict", ["--input=~/photos", "--output_dir=~/out"])
    assert (cfg.input, cfg.output_dir) == (f"{tmp_path}/photos", f"{tmp_path}/out")
    cfg = parse_config("pretrain_mae", ["--pretrain_dirs=~/a,b"])
    assert list(cfg.pretrain_dirs) == [f"{tmp_path}/a", "b"]


def test_a_run_name_outside_the_logdir_is_refused():
    """--run_name=. wrote model.keras and checkpoints/ among the other runs of --logdir."""
    from retina_tf.config import TrainConfig
    for name in (".", "..", "a/../..", "./x"):
        with pytest.raises(ConfigError, match="run_name=.*must name a folder inside --logdir"):
            TrainConfig(run_name=name)
    assert TrainConfig(run_name="group/run 1").run_name == "group/run 1"
