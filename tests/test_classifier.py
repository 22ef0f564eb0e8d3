"""The classifier stage: the evaluation network, trained on (a slice of) the real data."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest

from components import classifier
from components.config import parse_config
from tests.conftest import MIRROR, assert_stage_refuses_params, require_mirror, snapshot

# 3000 images, 2 epochs: seconds, and well above chance.
QUICK = {"train_limit": 3000, "epochs": 2, "min_test_accuracy": 0.0}


def quick_config(**keys):
    return parse_config({"data": {"mirror_dir": str(MIRROR)}, "classifier": {**QUICK, **keys}})


def test_network_shapes():
    model = classifier.build_classifier(width=8)
    assert model.output_shape == (None, 10)
    assert model.get_layer(classifier.FEATURE_LAYER).output.shape == (None, 128)
    assert model.input_shape == (None, 28, 28, 1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, classifier.ClassifierResult]:
    require_mirror()
    root = tmp_path_factory.mktemp("classifier")
    model, report = root / "models" / "classifier.keras", root / "reports" / "classifier.json"
    result = classifier.run_classifier(quick_config(), model, report)
    return model, report, result


def test_it_learns_the_classes_and_reports_its_accuracy(trained):
    model_path, report_path, result = trained
    assert result.train_examples == 3000 and result.epochs == 2
    assert result.test_accuracy > 0.7  # chance is 0.1
    report = json.loads(report_path.read_text())
    assert report["test_accuracy"] == result.test_accuracy
    assert set(report["per_class_accuracy"]) == set(classifier.CLASS_NAMES)
    assert report["feature_layer"] == "features" and report["feature_dim"] == 128

    # It loads in safe mode and its accuracy on the test split is what the report says.
    model = keras.saving.load_model(model_path, safe_mode=True)
    from components.ingest import fetch_verified

    arrays, _, _ = fetch_verified(quick_config().data)
    logits = model.predict(arrays.test_images[..., None].astype(np.float32), verbose=0)
    assert (logits.argmax(axis=1) == arrays.test_labels).mean() == pytest.approx(
        result.test_accuracy
    )


def test_same_seed_gives_identical_weights(trained, tmp_path: Path):
    model_path, _, _ = trained
    again = tmp_path / "classifier.keras"
    classifier.run_classifier(quick_config(), again, tmp_path / "report.json")
    first = keras.saving.load_model(model_path, safe_mode=True).get_weights()
    second = keras.saving.load_model(again, safe_mode=True).get_weights()
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_network_below_the_required_accuracy_fails_and_writes_nothing(trained, tmp_path):
    model_path, report_path, _ = trained
    before = snapshot(model_path.parent.parent)
    with pytest.raises(classifier.ClassifierError, match="below classifier.min_test_accuracy"):
        classifier.run_classifier(
            quick_config(train_limit=200, epochs=1, min_test_accuracy=0.99),
            model_path, report_path,
        )  # fmt: skip
    assert snapshot(model_path.parent.parent) == before


def test_the_command_line_names_a_bad_key(tmp_path: Path):
    assert_stage_refuses_params(
        "classifier", {"classifier": {"epochs": 0}},
        "classifier.epochs: Input should be greater than or equal to 1", tmp_path,
    )  # fmt: skip
