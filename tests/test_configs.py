"""Every shipped flagfile parses, states its budget, and builds its model."""

import inspect
from pathlib import Path

import pytest

from retina_tf import config
from retina_tf.errors import ConfigError
from retina_tf.flags import parse_config
from retina_tf.models import build_model, model_class, model_names
from retina_tf.training import model_kwargs

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.cfg"))


def test_the_expected_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert {"demo", "drive_unet", "drive_unet_fast", "drive_unet_15min", "chase_unet", "stare_unet",
            "hrf_unet", "rite_ripav", "lesav_ripav", "hrfav_ripav", "rite_rip_pretrain"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_parses_states_its_budget_and_builds(path, monkeypatch):
    monkeypatch.chdir(path.parents[1])  # nested --flagfile paths are relative to the repo
    text = path.read_text()
    assert "budget" in text.lower(), f"{path.name} must state its training budget"
    cfg = parse_config("train", [f"--flagfile={path}"])
    script = {"mae": "pretrain_mae", "rip_classifier": "pretrain_rip"}.get(cfg.model)
    if script:  # a pre-training flagfile
        cfg = parse_config(script, [f"--flagfile={path}"])
    assert cfg.time_budget_minutes > 0
    classes = 3 if cfg.task == "av" else 1
    model = build_model(cfg.model, **model_kwargs(cfg, input_channels=1, num_classes=classes))
    assert model.count_params() > 0
    # read from Python without absl, the same configs as the commands' (the U-Net flags
    # folded into model_config as bin/train.py folds them; evaluate's flags too)
    cls = type(cfg)
    assert config.from_flagfile(cls, path) == cfg
    assert config.from_flagfile(config.EvalConfig, path) == \
        parse_config("evaluate", [f"--flagfile={path}"])


def test_a_flagfile_read_from_python_refuses_what_the_commands_refuse(tmp_path):
    """from_flag_lines could not read a shipped flagfile (its --depth is no TrainConfig field)."""
    flagfile = tmp_path / "my.cfg"
    flagfile.write_text("--model=unet\n--depht=3\n")
    with pytest.raises(ConfigError, match=rf"{flagfile}: unknown flag --depht \(did you mean "
                                          r"--depth\?\)"):
        config.from_flagfile(config.TrainConfig, flagfile)
    flagfile.write_text("--model=hmsa\n--depth=3\n")
    with pytest.raises(ConfigError, match="--depth=3: --model=hmsa does not take it"):
        config.from_flagfile(config.TrainConfig, flagfile)
    flagfile.write_text('--model=unet\n--depth=3\n--model_config={"depth": 5}\n')
    with pytest.raises(ConfigError, match="--depth=3 and --model_config's depth=5 disagree"):
        config.from_flagfile(config.TrainConfig, flagfile)
    # the U-Net flags are the models' that list them, at the U-Net's own defaults
    takes = {name for name in model_names() if model_class(name).flag_arguments}
    assert takes == set(config.MODEL_FLAG_MODELS)
    unet = inspect.signature(model_class("unet").__init__).parameters
    assert set(model_class("unet").flag_arguments) == set(config.MODEL_FLAGS)
    assert {k: unet[k].default for k in config.MODEL_FLAGS} == config.MODEL_FLAGS
