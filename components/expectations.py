"""The Great Expectations side of the validate stage: what is checked, the run, Data Docs.

Each table the stage builds (see `components.validate`) becomes a pandas data asset with its
own expectation suite and validation definition, all named after the table, so that the
Data Docs list `train_examples`, `test_examples`, `train_classes`, `test_classes` and
`profile`. Every expectation carries a stable check name (`meta.check`): the name that
`summary.json`, the stage's error lines and the tests use.

GX does not raise when data fails; `run_checks` returns every outcome and the caller decides.
"""

from __future__ import annotations

import datetime
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import great_expectations as gx
import great_expectations.expectations as gxe
import pandas as pd
from great_expectations.core.run_identifier import RunIdentifier
from great_expectations.data_context.types.base import ProgressBarsConfig

from components.config import ValidateConfig
from components.ingest import CLASS_NAMES, IMAGE_SHAPE

NUM_CLASSES = len(CLASS_NAMES)
LABELS = list(range(NUM_CLASSES))
# How far a class's share of a random sample of n examples strays by chance: the class
# share bound is widened by this many standard errors, sqrt(p (1 - p) / n).
SAMPLING_Z = 4.0
DATASOURCE = "fashion_mnist"
DOCS_SITE = "validation_report"
# How many offending rows a failure line and the results JSON show.
EXAMPLES_SHOWN = 5


@dataclass(frozen=True)
class CheckedTable:
    """A table and the checks it must pass; `id_columns` identify a failing row."""

    name: str
    frame: pd.DataFrame
    checks: tuple[gxe.Expectation, ...]
    id_columns: tuple[str, ...]


@dataclass(frozen=True)
class Outcome:
    table: str
    check: str
    passed: bool
    observed: str
    expected: str

    def line(self) -> str:
        return f"{self.table}: {self.check}: observed {self.observed}; expected {self.expected}"


@dataclass(frozen=True)
class ChecksRun:
    outcomes: tuple[Outcome, ...]
    results: tuple[dict[str, Any], ...]  # GX's validation results, JSON-ready
    pages: Mapping[str, str]  # table -> its Data Docs page, relative to the docs folder

    @property
    def passed(self) -> bool:
        return all(outcome.passed for outcome in self.outcomes)


def _check(name: str, expected: str, expectation: gxe.Expectation, why: str) -> gxe.Expectation:
    """Label an expectation with its check name and what passing means, in plain words.

    Both travel in `meta`, so that each result (and the results JSON) carries them.
    """
    expectation.meta = {"check": name, "expected": expected}
    expectation.notes = why  # shown beside the expectation in Data Docs
    return expectation


def class_share_bounds(examples: int, tolerance: float) -> tuple[float, float]:
    """The allowed range of a class's share in a split of `examples` rows."""
    share = 1 / NUM_CLASSES
    noise = SAMPLING_Z * math.sqrt(share * (1 - share) / max(examples, 1))
    return max(0.0, share - tolerance - noise), min(1.0, share + tolerance + noise)


def example_checks(
    split: str, expected_rows: int, cfg: ValidateConfig, against_train: bool
) -> tuple[gxe.Expectation, ...]:
    """Checks on the per-example table of one split (see `components.example_stats`)."""
    checks = [
        _check(
            "row_count",
            f"{expected_rows} rows",
            gxe.ExpectTableRowCountToEqual(value=expected_rows),
            f"The {split} split holds every example: {expected_rows} (data.limit for train).",
        ),
        *(
            _check(
                "shape",
                f"{column} {size}",
                gxe.ExpectColumnValuesToBeInSet(column=column, value_set=[size]),
                "Every image is 28x28x1 (greyscale), the shape the DCGAN is built for.",
            )
            for column, size in zip(("height", "width", "channels"), IMAGE_SHAPE, strict=True)
        ),
        _check(
            "dtype",
            "dtype uint8",
            gxe.ExpectColumnValuesToBeInSet(column="dtype", value_set=["uint8"]),
            "Pixels are 8-bit integers; training scales them from [0, 255] to [-1, 1].",
        ),
        _check(
            "pixel_range",
            "no pixel below 0",
            gxe.ExpectColumnMinToBeBetween(column="min", min_value=0),
            "Pixel values lie in 0..255.",
        ),
        _check(
            "pixel_range",
            "no pixel above 255",
            gxe.ExpectColumnMaxToBeBetween(column="max", max_value=255),
            "Pixel values lie in 0..255.",
        ),
        _check(
            "labels_in_range",
            "every label in 0..9",
            gxe.ExpectColumnValuesToBeInSet(column="label", value_set=LABELS),
            "Labels name one of the 10 Fashion-MNIST classes.",
        ),
        _check(
            "all_classes_present",
            "each of the labels 0..9 present",
            gxe.ExpectColumnDistinctValuesToContainSet(column="label", value_set=LABELS),
            "No class is missing; with labels_in_range: the label set is exactly 0..9.",
        ),
        _check(
            "blank_images",
            f"every image's pixel std >= {cfg.min_image_std:g}",
            gxe.ExpectColumnValuesToBeBetween(column="std", min_value=cfg.min_image_std),
            "A (near) constant image is blank or saturated: validate.min_image_std.",
        ),
        _check(
            "duplicates",
            "no image twice in the split",
            gxe.ExpectColumnValuesToBeUnique(column="hash"),
            "Exact duplicates, found by a SHA-256 of each image's shape, dtype and pixels.",
        ),
    ]
    if against_train:
        checks.append(
            _check(
                "test_in_train",
                "no test image also in train",
                gxe.ExpectColumnValuesToBeInSet(column="in_train", value_set=[False]),
                "A test image seen in training would flatter every score computed on test.",
            )
        )
    return tuple(checks)


def class_checks(split: str, examples: int, cfg: ValidateConfig) -> tuple[gxe.Expectation, ...]:
    """Checks on the per-class table of one split (label, name, examples, share)."""
    low, high = class_share_bounds(examples, cfg.class_share_tolerance)
    return (
        _check(
            "class_balance",
            f"each class's share in [{low:.4f}, {high:.4f}]",
            gxe.ExpectColumnValuesToBeBetween(column="share", min_value=low, max_value=high),
            f"Fashion-MNIST is exactly balanced: 1/10 per class, within "
            f"validate.class_share_tolerance = {cfg.class_share_tolerance:g} plus "
            f"{SAMPLING_Z:g} standard errors of a {examples}-example sample.",
        ),
    )


def profile_checks(cfg: ValidateConfig) -> tuple[gxe.Expectation, ...]:
    """Checks on the per-split pixel profile (split, examples, pixel_mean, pixel_std)."""
    ref = cfg.reference
    return tuple(
        _check(
            f"pixel_{stat}",
            f"pixel {stat} within {ref.tolerance:g} of {value:g}",
            gxe.ExpectColumnValuesToBeBetween(
                column=f"pixel_{stat}",
                min_value=value - ref.tolerance,
                max_value=value + ref.tolerance,
            ),
            f"Each split's pixel {stat} matches Fashion-MNIST's (validate.reference): "
            "inverted, rescaled or different images move it.",
        )
        for stat, value in (("mean", ref.mean), ("std", ref.std))
    )


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    if hasattr(value, "item"):  # numpy scalars
        return _short(value.item())
    text = str(value)
    return text if len(text) <= 24 else text[:12] + "..."  # content hashes


def _observed(result: Mapping[str, Any]) -> str:
    """What GX saw, in a few words, for any of the expectation kinds used here."""
    if "partial_missing_list" in result:  # distinct values must contain a set
        missing = result["partial_missing_list"]
        return f"missing {_short(missing)}" if missing else "none missing"
    if "unexpected_count" in result:  # a check on each row
        count, total = result["unexpected_count"], result.get("element_count")
        text = f"{count} of {total} rows fail"
        rows = result.get("partial_unexpected_index_list") or result.get("partial_unexpected_list")
        if count and rows:
            ids = result.get("unexpected_index_column_names") or []
            text += ", e.g. " + ", ".join(
                _short(_ids_first(row, ids)) for row in rows[:EXAMPLES_SHOWN]
            )
        return text
    return _short(result.get("observed_value"))


def _error(exception_info: Any) -> str | None:
    """GX's message when an expectation could not be evaluated (e.g. a missing column).

    `exception_info` is one {raised_exception, exception_message} or a mapping of them
    keyed by metric.
    """
    if not isinstance(exception_info, Mapping):
        return None
    if exception_info.get("raised_exception"):
        return str(exception_info.get("exception_message"))
    found = (_error(value) for value in exception_info.values())
    return next((message for message in found if message), None)


def _ids_first(row: Any, ids: Sequence[str]) -> Any:
    """A failing row as {id columns..., checked value}: `{index: 3, label: 10}`."""
    if not isinstance(row, Mapping):
        return row
    return {key: row[key] for key in [*ids, *row] if key in row} if ids else row


def _new_context(docs_dir: Path):
    # GX pins this logger to INFO when imported, to announce a temporary docs folder that
    # this run never uses; keep it to warnings.
    logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
    context = gx.get_context(mode="ephemeral")
    # Progress bars flood logs; results stay in memory; Data Docs go only to docs_dir.
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    context.add_data_docs_site(
        DOCS_SITE,
        {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(docs_dir.resolve()),  # GX requires it absolute
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    return context


def run_checks(tables: Sequence[CheckedTable], docs_dir: Path, run_name: str) -> ChecksRun:
    """Validate every table with GX, then build the Data Docs site in `docs_dir`."""
    context = _new_context(docs_dir)
    source = context.data_sources.add_pandas(DATASOURCE)
    run_id = RunIdentifier(run_name=run_name, run_time=datetime.datetime.now(datetime.UTC))
    outcomes: list[Outcome] = []
    results: list[dict[str, Any]] = []
    for table in tables:
        batch = source.add_dataframe_asset(table.name).add_batch_definition_whole_dataframe(
            "all rows"
        )
        suite = context.suites.add(
            gx.ExpectationSuite(name=table.name, expectations=list(table.checks))
        )
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=table.name, data=batch, suite=suite)
        )
        result = definition.run(
            batch_parameters={"dataframe": table.frame},
            result_format={
                "result_format": "SUMMARY",
                "partial_unexpected_count": EXAMPLES_SHOWN,
                "unexpected_index_column_names": list(table.id_columns),
            },
            run_id=run_id,
        )
        results.append(result.to_json_dict())
        for item in result.results:
            meta = item.expectation_config.meta
            error = _error(item.exception_info)
            outcomes.append(
                Outcome(
                    table=table.name,
                    check=meta["check"],
                    passed=bool(item.success) and error is None,
                    observed=f"error: {error}" if error else _observed(item.result),
                    expected=meta["expected"],
                )
            )
    context.build_data_docs(site_names=[DOCS_SITE])
    # A fresh context holds one result per suite, so each suite has one page.
    pages = {
        table.name: next((docs_dir / "validations" / table.name).rglob("*.html"))
        .relative_to(docs_dir)
        .as_posix()
        for table in tables
    }
    return ChecksRun(tuple(outcomes), tuple(results), pages)
