"""params.yaml parsing: defaults accepted, every kind of bad input rejected by key."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest
import yaml

from components.config import (
    Config,
    ConfigError,
    apply_overrides,
    load_config,
    parse_config,
)
from tests.conftest import REPO_ROOT


def test_repository_params_parse_into_frozen_config():
    cfg = load_config(REPO_ROOT / "params.yaml")
    assert isinstance(cfg, Config)
    assert cfg.seed == 42
    assert cfg.data.mirror_dir == "/usr/share/datasets/fashion-mnist"
    assert cfg.data.limit is None
    assert cfg.train.batch_size == 64  # the CPU default (README: Defaults, CPU and GPU)
    assert (cfg.train.generator_width, cfg.train.discriminator_width) == (64, 32)
    assert cfg.generate.num_samples == 10_000
    assert cfg.classifier.train_limit is None  # the evaluation network sees all 60000 images
    assert cfg.evaluate.feature_model == "classifier"
    assert cfg.validate.reference.mean == 72.94
    assert cfg.validate.reference.std == 90.02
    with pytest.raises(pydantic.ValidationError):
        cfg.train.epochs = 3  # frozen: nothing changes config after parsing


@pytest.mark.parametrize(
    ("raw", "key", "fragment"),
    [
        ({"train": {"epochs": -1}}, "train.epochs", ">= 1"),
        ({"train": {"epochs": 0}}, "train.epochs", ">= 1"),
        ({"train": {"epochs": "ten"}}, "train.epochs", "valid integer"),
        ({"train": {"epochs": 2.5}}, "train.epochs", "valid integer"),
        ({"train": {"batch_size": 0}}, "train.batch_size", ">= 1"),
        ({"data": {"limit": 0}}, "data.limit", "or null"),
        ({"data": {"limit": 60_001}}, "data.limit", "<= 60000"),
        ({"data": {"limit": "100"}}, "data.limit", "valid integer"),
        ({"data": {"mirror_dir": ""}}, "data.mirror_dir", "at least 1 character"),
        ({"data": {"mirror_dir": 5}}, "data.mirror_dir", "valid string"),
        ({"seed": -3}, "seed", ">= 0"),
        ({"seed": True}, "seed", "valid integer"),
        ({"generate": {"num_samples": 1}}, "generate.num_samples", ">= 2"),
        ({"generate": {"interpolation_steps": 1}}, "generate.interpolation_steps", ">= 2"),
        ({"classifier": {"min_test_accuracy": 1.5}}, "classifier.min_test_accuracy", "<= 1"),
        ({"classifier": {"train_limit": 0}}, "classifier.train_limit", "or null"),
        ({"evaluate": {"nearest_k": 0}}, "evaluate.nearest_k", ">= 1"),
        ({"evaluate": {"real_images": 70_000}}, "evaluate.real_images", "<= 60000"),
        ({"evaluate": {"feature_model": ""}}, "evaluate.feature_model", "at least 1 character"),
        ({"data": {"limt": 10}}, "data.limt", "unknown key (allowed here: mirror_dir, limit)"),
        (
            {"trian": {"epochs": 1}},
            "trian",
            "unknown key (allowed here: seed, data, validate, train",
        ),
        ({"data": 7}, "data", "valid dictionary"),
        ({"validate": {"min_image_std": -1}}, "validate.min_image_std", ">= 0"),
        ({"validate": {"class_share_tolerance": 2}}, "validate.class_share_tolerance", "<= 1"),
        ({"validate": {"reference": {"tolerance": 0}}}, "validate.reference.tolerance", "> 0"),
        ({"validate": {"reference": {"std": "90"}}}, "validate.reference.std", "valid number"),
        (
            {"validate": {"reference": {"mena": 70}}},
            "validate.reference.mena",
            "unknown key (allowed here: mean, std, tolerance)",
        ),
    ],
)
def test_bad_values_are_rejected_naming_the_key(raw, key, fragment):
    with pytest.raises(ConfigError) as excinfo:
        parse_config(raw)
    message = str(excinfo.value)
    assert f"  - {key}:" in message
    assert fragment in message


def test_every_bad_key_is_reported_at_once():
    with pytest.raises(ConfigError) as excinfo:
        parse_config({"train": {"epochs": -1}, "data": {"limit": 0}})
    assert "train.epochs" in str(excinfo.value)
    assert "data.limit" in str(excinfo.value)


def test_top_level_must_be_a_mapping():
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_config(["seed", 1])  # type: ignore[arg-type]


def test_missing_file_and_bad_yaml_say_what_to_do(tmp_path: Path):
    with pytest.raises(ConfigError, match="no such file; run from the repository root"):
        load_config(tmp_path / "absent.yaml")
    broken = tmp_path / "params.yaml"
    broken.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


def test_overrides_are_validated_like_the_file(tmp_path: Path):
    params = tmp_path / "params.yaml"
    params.write_text((REPO_ROOT / "params.yaml").read_text())
    cfg = load_config(params, overrides={"train.epochs": 3, "data.limit": 1000})
    assert (cfg.train.epochs, cfg.data.limit) == (3, 1000)
    with pytest.raises(ConfigError, match="train.epoch: unknown key"):
        load_config(params, overrides={"train.epoch": 3})
    with pytest.raises(ConfigError, match="data.limit: .*got 0"):
        load_config(params, overrides={"data.limit": 0})


def test_override_structure_errors():
    with pytest.raises(ConfigError, match="seed is a value, not a section"):
        apply_overrides({"seed": 1}, {"seed.value": 2})
    with pytest.raises(ConfigError, match="not a dotted params key"):
        apply_overrides({}, {"train..epochs": 2})
    original = {"train": {"epochs": 1}}
    apply_overrides(original, {"train.epochs": 9})
    assert original == {"train": {"epochs": 1}}  # the input is not mutated


def _leaf_keys(model: type[pydantic.BaseModel], prefix: str = "") -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
            keys |= _leaf_keys(annotation, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def test_params_yaml_spells_out_every_knob():
    """No hidden defaults: DVC tracks params by key, so each one must be in the file."""
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())

    def flatten(node: dict, prefix: str = "") -> set[str]:
        keys = set()
        for name, value in node.items():
            if isinstance(value, dict):
                keys |= flatten(value, f"{prefix}{name}.")
            else:
                keys.add(f"{prefix}{name}")
        return keys

    assert flatten(raw) == _leaf_keys(Config)
