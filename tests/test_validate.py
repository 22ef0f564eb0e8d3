"""The validate stage on small tfds datasets written by the tests: real Fashion-MNIST
images (the first 400 train and 200 test), clean or with one defect each."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components import expectations, validate
from components.config import DataConfig, ValidateConfig
from components.example_stats import COLUMNS, DatasetError, batch_stats, read_example_stats
from components.expectations import class_share_bounds
from tests.conftest import Splits, real_sample, snapshot, write_tfds

N_TRAIN, N_TEST = 400, 200
EXPECTED = {"train": N_TRAIN, "test": N_TEST}
CFG = ValidateConfig()  # the defaults of params.yaml: the small real sample passes them


@pytest.fixture(scope="module")
def sample() -> Splits:
    return real_sample(N_TRAIN, N_TEST)


def failed_checks(report: validate.ValidationReport) -> set[tuple[str, str]]:
    return {(f["table"], f["check"]) for f in report.summary["failed"]}


def validate_splits(tmp_path: Path, splits: Splits, image_shape=(28, 28, 1), expected=EXPECTED):
    dataset = write_tfds(tmp_path / "data", splits, image_shape)
    return validate.run_validate(CFG, expected, dataset, tmp_path / "report")


def test_clean_sample_passes_and_writes_the_report(tmp_path: Path, sample: Splits):
    dataset = write_tfds(tmp_path / "data", sample)
    before = snapshot(dataset)
    out = tmp_path / "reports" / "validation"
    report = validate.run_validate(CFG, EXPECTED, dataset, out)

    assert report.passed, report.failure_lines
    assert snapshot(dataset) == before  # the stage only reads the data
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passed"] is True
    assert summary["checks_failed"] == 0 and summary["failed"] == []
    assert summary["checks_evaluated"] == len(summary["checks"]) == 27
    assert summary["counts"]["train"]["examples"] == N_TRAIN
    assert summary["counts"]["test"]["also_in_train"] == 0
    assert sum(summary["counts"]["test"]["per_class"]) == N_TEST
    assert summary["dataset_fingerprint"] == validate.dataset_fingerprint(dataset)
    expected_mean = np.mean(np.stack(sample.train_images).astype(float))
    assert summary["profile"]["train"]["pixel_mean"] == pytest.approx(expected_mean, abs=1e-3)

    results = json.loads((out / "results.json").read_text())
    assert results["success"] is True
    assert len(results["validations"]) == 5
    assert {v["suite_name"] for v in results["validations"]} == {
        "train_examples",
        "test_examples",
        "train_classes",
        "test_classes",
        "profile",
    }
    # Data Docs: GX's site, and our page linking to each suite's result page.
    assert (out / "data_docs" / "index.html").is_file()
    index = (out / "index.html").read_text()
    links = re.findall(r"href='([^']+)'|href=\"([^\"]+)\"", index)
    targets = [a or b for a, b in links]
    assert len([t for t in targets if t.startswith("data_docs/validations/")]) == 27
    for target in targets:
        assert (out / target).is_file(), target
    page = (out / "data_docs" / summary["report"]["pages"]["train_examples"]).read_text()
    text = " ".join(re.sub(r"<[^>]+>", " ", page).split())
    assert "Status: Succeeded" in text and "Must have exactly 400 rows" in text


def with_defect(sample: Splits, defect) -> Splits:
    splits = sample.copy()
    defect(splits)
    return splits


def _label_10(s: Splits):
    s.train_labels[3] = 10


def _blank(s: Splits):
    s.train_images[5][:] = 0


def _saturated(s: Splits):
    s.test_images[7][:] = 255


def _class_missing(s: Splits):
    keep = s.train_labels != 7
    s.train_images = [i for i, k in zip(s.train_images, keep, strict=True) if k]
    s.train_labels = s.train_labels[keep]


def _one_class_at_90_percent(s: Splits):
    s.train_labels[: int(0.9 * N_TRAIN)] = 0


def _test_image_in_train(s: Splits):
    s.train_images[10] = s.test_images[20].copy()


def _duplicate(s: Splits):
    s.train_images[11] = s.train_images[12].copy()


def _inverted(s: Splits):
    s.train_images = [255 - i for i in s.train_images]
    s.test_images = [255 - i for i in s.test_images]


@pytest.mark.parametrize(
    ("defect", "failures", "observed"),
    [
        (_label_10, {("train_examples", "labels_in_range")}, "{index: 3, label: 10}"),
        (_blank, {("train_examples", "blank_images")}, "{index: 5, label: 2, std: 0}"),
        (_saturated, {("test_examples", "blank_images")}, "{index: 7, label: 6, std: 0}"),
        (
            _class_missing,
            {
                ("train_examples", "row_count"),
                ("train_examples", "all_classes_present"),
                ("train_classes", "class_balance"),
            },
            "missing [7]",
        ),
        (_one_class_at_90_percent, {("train_classes", "class_balance")}, "share: 0.9"),
        (_test_image_in_train, {("test_examples", "test_in_train")}, "{index: 20,"),
        (_duplicate, {("train_examples", "duplicates")}, "2 of 400 rows fail, e.g. {index: 11,"),
        (
            _inverted,
            {("profile", "pixel_mean")},
            "{split: train, pixel_mean: 18",
        ),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
def test_each_defect_fails_the_check_that_names_it(
    tmp_path: Path, sample: Splits, defect, failures, observed
):
    report = validate_splits(tmp_path, with_defect(sample, defect))
    assert not report.passed
    assert failed_checks(report) == failures
    assert any(observed in line for line in report.failure_lines), report.failure_lines
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["passed"] is False
    assert summary["checks_failed"] == len(summary["failed"]) >= 1


def test_a_wrong_shape_is_reported_whether_or_not_the_features_declare_it(
    tmp_path: Path, sample: Splits
):
    splits = sample.copy()
    splits.train_images[4] = np.random.default_rng(0).integers(0, 256, (28, 30), np.uint8)
    # Declared variable: tfds decodes each image at its own size.
    report = validate_splits(tmp_path / "variable", splits, image_shape=(None, None, 1))
    assert failed_checks(report) == {("train_examples", "shape")}
    assert report.failure_lines == (
        "train_examples: shape: observed 1 of 400 rows fail, e.g. {index: 4, label: 0, width: 30}; "
        "expected width 28",
    )
    # Declared 28x28x1 but stored 28x30: tfds itself refuses the image; validation reports it.
    report = validate_splits(tmp_path / "declared", splits, image_shape=(28, 28, 1))
    assert failed_checks(report) == {("train_examples", "shape")}
    assert "{index: 4, label: 0, width: 30}" in report.failure_lines[0]


def test_row_counts_follow_data_limit(tmp_path: Path, sample: Splits):
    assert validate.expected_rows(DataConfig(limit=1000)) == {"train": 1000, "test": 10_000}
    assert validate.expected_rows(DataConfig()) == {"train": 60_000, "test": 10_000}
    report = validate_splits(tmp_path, sample, expected={"train": 500, "test": N_TEST})
    assert failed_checks(report) == {("train_examples", "row_count")}
    assert any("observed 400; expected 500 rows" in line for line in report.failure_lines)


def test_a_failed_run_replaces_the_report_and_a_broken_dataset_keeps_it(
    tmp_path: Path, sample: Splits
):
    out = tmp_path / "report"
    validate.run_validate(CFG, EXPECTED, write_tfds(tmp_path / "good", sample), out)
    bad = write_tfds(tmp_path / "bad", with_defect(sample, _label_10))
    validate.run_validate(CFG, EXPECTED, bad, out)
    assert json.loads((out / "summary.json").read_text())["passed"] is False

    before = snapshot(out)
    with pytest.raises(DatasetError, match="no prepared tfds dataset here"):
        validate.run_validate(CFG, EXPECTED, tmp_path / "nothing", out)
    shard = next(bad.glob("*train.tfrecord*"))
    shard.write_bytes(shard.read_bytes()[:5000])  # a damaged shard
    with pytest.raises(DatasetError, match="train split: cannot read the examples"):
        validate.run_validate(CFG, EXPECTED, bad, out)
    assert snapshot(out) == before
    assert not list(tmp_path.glob(".report.*")), "scratch folders left behind"


def test_cli_prints_each_failure_on_one_line_and_exits_1(
    tmp_path: Path, sample: Splits, capsys, monkeypatch
):
    dataset = write_tfds(tmp_path / "data", with_defect(sample, _inverted))
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  limit: 400\n")
    # Test split of 200 instead of 10000: also a failure, with its own line.
    code = validate.main(
        ["--params", str(params), "--data", str(dataset), "--out", str(tmp_path / "r")]
    )
    err = capsys.readouterr().err
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("validate: FAILED")]
    assert lines == [
        "validate: FAILED test_examples: row_count: observed 200; expected 10000 rows",
        "validate: FAILED profile: pixel_mean: observed 2 of 2 rows fail, e.g. "
        + lines[1].split("e.g. ", 1)[1],
    ]
    assert (
        "{split: train, pixel_mean: 182." in lines[1]
        and "expected pixel mean within 5 of 72.94" in lines[1]
    )
    assert "2 of 27 checks failed; the data did not pass validation" in err


def test_cli_errors_name_the_problem(tmp_path: Path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("validate:\n  min_image_std: -1\n")
    assert validate.main(["--params", str(params)]) == 1
    assert "validate.min_image_std: Input should be greater than or equal to 0" in (
        capsys.readouterr().err
    )
    params.write_text("{}\n")
    assert validate.main(["--params", str(params), "--data", str(tmp_path / "none")]) == 1
    assert "run the ingest stage first: dvc repro ingest" in capsys.readouterr().err


def test_batch_stats_and_pooled_profile_match_numpy():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 28, 28, 1), dtype=np.uint8)
    stats = batch_stats(images, np.arange(6))
    flat = images.reshape(6, -1).astype(float)
    assert np.allclose(stats["mean"], flat.mean(1)) and np.allclose(stats["std"], flat.std(1))
    assert stats["min"].tolist() == flat.min(1).tolist()
    assert len(set(stats["hash"])) == 6
    # Same pixels, other shape: not the same content.
    assert batch_stats(images.reshape(6, 784, 1, 1), np.arange(6))["hash"] != stats["hash"]

    table = pd.DataFrame(stats)
    mean, std = validate.pixel_profile(table)
    assert mean == pytest.approx(flat.mean()) and std == pytest.approx(flat.std())


def test_class_share_bounds_widen_only_by_sampling_error():
    low, high = class_share_bounds(60_000, 0.01)
    assert (low, high) == pytest.approx(
        (0.1 - 0.01 - 4 * (0.09 / 60_000) ** 0.5, 0.1 + 0.01 + 4 * (0.09 / 60_000) ** 0.5)
    )
    assert high - low < 0.03  # the full data: a class at 0.12 would fail
    small_low, small_high = class_share_bounds(100, 0.01)
    assert small_low < low and small_high > high and small_high < 0.9


def test_read_example_stats_on_the_tfds_format(tmp_path: Path, sample: Splits):
    tables = read_example_stats(write_tfds(tmp_path, sample))
    train = tables["train"]
    assert tuple(train.columns) == COLUMNS
    assert len(train) == N_TRAIN and train["index"].tolist() == list(range(N_TRAIN))
    assert train["label"].tolist() == sample.train_labels.tolist()
    assert set(train["dtype"]) == {"uint8"} and set(train["height"]) == {28}


def test_an_empty_split_fails_without_crashing(tmp_path: Path, sample: Splits, monkeypatch):
    dataset = write_tfds(tmp_path / "data", sample)
    tables = read_example_stats(dataset)
    tables["test"] = tables["test"].iloc[:0]
    monkeypatch.setattr(validate, "read_example_stats", lambda _: tables)
    report = validate.run_validate(CFG, EXPECTED, dataset, tmp_path / "report")
    assert {("test_examples", "row_count"), ("test_examples", "all_classes_present")} <= (
        failed_checks(report)
    )
    assert report.summary["counts"]["test"]["examples"] == 0


def test_a_check_gx_cannot_evaluate_fails_with_gx_s_message(tmp_path: Path):
    table = expectations.CheckedTable(
        name="profile",
        frame=pd.DataFrame({"split": ["train"], "pixel_std": [90.0]}),
        checks=expectations.profile_checks(CFG),
        id_columns=("split",),
    )
    run = expectations.run_checks([table], tmp_path / "docs", run_name="test")
    assert not run.passed
    by_check = {outcome.check: outcome for outcome in run.outcomes}
    assert by_check["pixel_std"].passed
    assert not by_check["pixel_mean"].passed
    assert 'error: Error: The column "pixel_mean" in BatchData does not exist' in (
        by_check["pixel_mean"].observed
    )
