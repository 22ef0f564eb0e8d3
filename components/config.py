"""The one typed view of `params.yaml`.

`load_config()` parses the file once into frozen pydantic models. Unknown keys, wrong
types and out-of-range values are rejected before any work starts, with the dotted key
(`train.epochs`) and what it accepts in the message.
"""

from __future__ import annotations

import copy
import re
import warnings
import zoneinfo
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DEFAULT_PARAMS_PATH = Path("params.yaml")

# Fashion-MNIST's training split has 60000 examples; `data.limit` can only shrink it.
FULL_TRAIN_SIZE = 60_000


class ConfigError(ValueError):
    """params.yaml (or an override) is invalid; the message names each bad key."""


class _Section(BaseModel):
    # frozen: config cannot change after parsing; forbid: a typo is an error, not a no-op;
    # strict: "10" is not silently an int, 1.5 is not silently truncated.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class DataConfig(_Section):
    mirror_dir: str = Field(
        "/usr/share/datasets/fashion-mnist",
        min_length=1,
        description="Folder with the four raw IDX .gz files (Debian's dataset-fashion-mnist).",
    )
    limit: int | None = Field(
        None,
        ge=1,
        le=FULL_TRAIN_SIZE,
        description="Keep the first N training examples (null: all); the test split stays whole.",
    )


class ReferenceProfile(_Section):
    """Pixel statistics of the real data; a split that strays from them is a different dataset."""

    mean: float = Field(72.94, ge=0, le=255, description="Fashion-MNIST train pixel mean.")
    std: float = Field(90.02, gt=0, le=255, description="Fashion-MNIST train pixel std.")
    tolerance: float = Field(5.0, gt=0, le=255, description="Allowed distance, in pixel units.")


class ValidateConfig(_Section):
    min_image_std: float = Field(
        5.0, ge=0, le=255, description="Below this per-image pixel std: a blank or saturated image."
    )
    class_share_tolerance: float = Field(
        0.01, ge=0, le=1, description="Allowed distance of a class's share from 1/10."
    )
    reference: ReferenceProfile = ReferenceProfile()


class TrainConfig(_Section):
    epochs: int = Field(10, ge=1, le=10_000)
    batch_size: int = Field(256, ge=1, le=65_536)
    # The model (components/models.py); the tutorial's is 100 / 256 / 64 / 0.3.
    latent_dim: int = Field(100, ge=1, le=4096)
    generator_width: int = Field(256, ge=4, le=4096, multiple_of=4)
    discriminator_width: int = Field(64, ge=1, le=4096)
    dropout: float = Field(0.3, ge=0, lt=1)
    # Adam, the same for both networks.
    learning_rate: float = Field(2e-4, gt=0, lt=1)
    beta_1: float = Field(0.5, ge=0, lt=1)
    # Exponential moving average of the generator's weights (0: off); samples come from it.
    ema_decay: float = Field(0.999, ge=0, lt=1)
    checkpoint_every: int = Field(1, ge=1, le=10_000)
    keep_checkpoints: int = Field(2, ge=1, le=100)
    grid_size: int = Field(64, ge=1, le=1024)
    deterministic: bool = True
    strategy: Literal["auto", "mirrored", "multi_worker"] = "auto"
    mixed_precision: Literal["auto", "off", "float16", "bfloat16"] = "auto"
    jit_compile: bool = False


class ClassifierConfig(_Section):
    """The evaluation network (components/classifier.py): a small CNN on Fashion-MNIST."""

    epochs: int = Field(8, ge=1, le=1000)
    batch_size: int = Field(128, ge=1, le=60_000)
    learning_rate: float = Field(2e-3, gt=0, lt=1, description="Peak of the cosine schedule.")
    width: int = Field(32, ge=1, le=1024, description="Channels of the first convolution.")
    train_limit: int | None = Field(
        None, ge=1, le=FULL_TRAIN_SIZE, description="First N training images (null: all)."
    )
    min_test_accuracy: float = Field(0.9, ge=0, le=1)


class GenerateConfig(_Section):
    num_samples: int = Field(10_000, ge=2, le=1_000_000)
    interpolation_pairs: int = Field(8, ge=1, le=64)
    interpolation_steps: int = Field(10, ge=2, le=64)


class EvaluateConfig(_Section):
    feature_model: str = Field(
        "classifier", min_length=1, description="`classifier`, or a Keras model file's path."
    )
    feature_layer: str = Field("features", description="Layer name; empty: the model's output.")
    nearest_k: int = Field(5, ge=1, le=100)
    kid_subsets: int = Field(50, ge=1, le=10_000)
    kid_subset_size: int = Field(1000, ge=2, le=100_000)
    score_splits: int = Field(10, ge=1, le=100)
    real_images: int = Field(10_000, ge=2, le=FULL_TRAIN_SIZE)


# One cron field: numbers, names (MON, JAN), *, ranges, steps, lists, and ? L W # forms.
_CRON_FIELD = re.compile(r"[0-9A-Za-z*?/,#-]+")


class ScheduleConfig(_Section):
    """The deployment `dcgan-pipeline/nightly` (flows/serve.py): when it runs by itself."""

    cron: str = Field("0 2 * * *", description="Five-field cron expression (minute first).")
    timezone: str = Field("UTC", min_length=1, description="IANA time zone of `cron`.")
    # A run due while another is active: cancel it (the next one comes on schedule), or
    # queue it until the active one ends. Never side by side: they share one workspace.
    on_collision: Literal["cancel", "enqueue"] = "cancel"

    @field_validator("cron")
    @classmethod
    def _five_fields(cls, value: str) -> str:
        fields = value.split()
        if len(fields) != 5 or not all(_CRON_FIELD.fullmatch(f) for f in fields):
            raise ValueError("expected five cron fields: minute hour day month weekday")
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError("not an IANA time zone such as UTC or Europe/Berlin") from None
        return value


with warnings.catch_warnings():
    # The section is named after its stage, `validate`, which shadows pydantic's deprecated
    # `BaseModel.validate` classmethod; nothing here uses that, so the warning is noise.
    warnings.filterwarnings("ignore", message='Field name "validate"', category=UserWarning)

    class Config(_Section):
        seed: int = Field(42, ge=0, le=2**31 - 1)
        data: DataConfig = DataConfig()
        validate: ValidateConfig = ValidateConfig()
        train: TrainConfig = TrainConfig()
        classifier: ClassifierConfig = ClassifierConfig()
        generate: GenerateConfig = GenerateConfig()
        evaluate: EvaluateConfig = EvaluateConfig()
        schedule: ScheduleConfig = ScheduleConfig()


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The model class when a field holds a section (a nested model), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _describe(error: Mapping[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        parent = _model_at(error["loc"][:-1])
        allowed = ", ".join(parent.model_fields) if parent else "see params.yaml"
        return f"{key}: unknown key (allowed here: {allowed})"
    if error["type"] == "value_error":  # our own validators: the message says it all
        return f"{key}: {error['msg'].removeprefix('Value error, ')} (got {error['input']!r})"
    message = f"{key}: {error['msg']} (got {error['input']!r})"
    allowed = _allowed_values(error["loc"])
    return f"{message}; allowed: {allowed}" if allowed else message


def _allowed_values(loc: tuple[Any, ...]) -> str | None:
    """Say what a leaf key accepts, from its type and bounds: 'int >= 1, <= 60000, or null'."""
    parent = _model_at(loc[:-1])
    field = parent.model_fields.get(str(loc[-1])) if parent and loc else None
    if field is None or _section_model(field.annotation):
        return None
    bounds = []
    for rule in field.metadata:
        for attr, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(rule, attr, None) is not None:
                bounds.append(f"{symbol} {getattr(rule, attr)}")
        if getattr(rule, "multiple_of", None):
            bounds.append(f"a multiple of {rule.multiple_of}")
        if getattr(rule, "min_length", None):
            bounds.append(f"length >= {rule.min_length}")
    if get_origin(field.annotation) is Literal:
        return "one of " + ", ".join(repr(choice) for choice in get_args(field.annotation))
    kinds = [a.__name__ for a in getattr(field.annotation, "__args__", (field.annotation,))]
    nullable = "NoneType" in kinds
    text = " or ".join(k for k in kinds if k != "NoneType")
    if bounds:
        text += " " + ", ".join(bounds)
    return text + (", or null" if nullable else "")


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class that owns the keys at `loc` (() is the top level)."""
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        section = _section_model(field.annotation) if field else None
        if section is None:
            return None
        model = section
    return model


def parse_config(raw: Mapping[str, Any] | None, source: str = "params.yaml") -> Config:
    """Validate a params mapping; raise ConfigError naming every bad key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level, got {raw!r}")
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        problems = "\n".join(f"  - {_describe(e)}" for e in exc.errors())
        raise ConfigError(f"{source} is invalid:\n{problems}") from None


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of `raw` with dotted keys (`"train.epochs": 5`) set.

    Only the structure is touched here; `parse_config` then checks the result, so an
    override with an unknown key or a bad value fails with the same message as the file.
    """
    merged = copy.deepcopy(dict(raw))
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        if not all(parts):
            raise ConfigError(f"override {dotted!r}: not a dotted params key like 'train.epochs'")
        node = merged
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(f"override {dotted!r}: {where} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return merged


def load_config(
    path: str | Path = DEFAULT_PARAMS_PATH, overrides: Mapping[str, Any] | None = None
) -> Config:
    """Read params.yaml (plus optional dotted overrides) into a frozen Config."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such file; run from the repository root or pass --params PATH"
        ) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if overrides:
        raw = apply_overrides(raw or {}, overrides)
    return parse_config(raw, source=str(path))
