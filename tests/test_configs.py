"""Every shipped flagfile parses, states its budget, and builds its model."""

from pathlib import Path

import pytest

from retina_tf.flags import parse_config
from retina_tf.models import build_model
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
