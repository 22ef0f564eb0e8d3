"""The evaluate stage on small real data: real images score near the floor, noise far from
it; every key is written; the feature network can be swapped; bad inputs are named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml
from PIL import Image

from components import classifier, evaluate
from components.config import parse_config
from components.generate import npz_bytes
from components.validate import UnvalidatedDataError
from tests.conftest import (
    MIRROR,
    REPO_ROOT,
    ValidatedData,
    assert_stage_refuses_params,
    real_sample,
    validated_data,
)

EVALUATE = {"real_images": 400, "kid_subsets": 10, "kid_subset_size": 200, "nearest_k": 3}
METRIC_KEYS = {
    "fid", "kid", "inception_score", "precision", "recall", "density", "coverage",
    "class_entropy_bits", "class_entropy_normalized", "smallest_class_share",
    "classes_present", "class_shares",
}  # fmt: skip


def config(**evaluate_keys):
    return parse_config({"seed": 5, "evaluate": {**EVALUATE, **evaluate_keys}})


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, ValidatedData]:
    """A quickly trained classifier and a validated dataset (400 train, 500 test images)."""
    root = tmp_path_factory.mktemp("evaluate")
    cfg = parse_config(
        {
            "data": {"mirror_dir": str(MIRROR)},
            "classifier": {"train_limit": 5000, "epochs": 2, "min_test_accuracy": 0.75},
        }
    )
    model = root / "classifier.keras"
    classifier.run_classifier(cfg, model, root / "classifier.json")
    return model, validated_data(root, n_train=400, n_test=500)


def write_samples(path: Path, images: np.ndarray) -> Path:
    path.write_bytes(npz_bytes(images=images))
    return path


def real_images(count: int) -> np.ndarray:
    """Real training images other than the first 400 (which the floor uses)."""
    return np.stack(real_sample(400 + count, 1).train_images[400:])


def run_in(tmp_path: Path, world, samples: Path, cfg=None) -> evaluate.EvaluateResult:
    model, data = world
    return evaluate.run_evaluate(
        cfg or config(), samples, model, data.dataset_dir, data.summary,
        tmp_path / "metrics.json", tmp_path / "class_histogram.json", tmp_path / "grid.png",
    )  # fmt: skip


def test_real_images_score_near_the_floor_and_noise_far_from_it(world, tmp_path: Path):
    real = run_in(tmp_path / "real", world, write_samples(tmp_path / "r.npz", real_images(400)))
    noise_images = np.random.default_rng(0).integers(0, 256, (400, 28, 28), dtype=np.uint8)
    noise = run_in(tmp_path / "noise", world, write_samples(tmp_path / "n.npz", noise_images))
    good, bad, floor = real.metrics, noise.metrics, real.metrics["floor"]

    # Real images are another draw of the floor's distribution: the same figures, roughly.
    assert good["fid"] < 2 * floor["fid"] + 1
    assert good["precision"] > 0.8 and good["recall"] > 0.8 and good["coverage"] > 0.8
    assert good["classes_present"] == 10 and good["smallest_class_share"] > 0.03
    # Noise is nothing like garments.
    assert bad["fid"] > 20 * good["fid"]
    assert bad["kid"]["mean"] > 20 * max(good["kid"]["mean"], 1e-4)
    # Noise covers none of the real balls and finds few real points near it. (Precision is
    # fooled by outliers of the real set, whose wide balls swallow the noise: the weakness
    # density and coverage were designed to fix, Naeem et al. 2020.)
    assert bad["recall"] < 0.05 and bad["coverage"] < 0.05
    assert bad["density"] < 0.5 * good["density"]
    assert bad["inception_score"]["mean"] < good["inception_score"]["mean"]
    # The floor does not depend on the samples.
    assert noise.metrics["floor"] == floor


def test_every_figure_is_written_beside_its_floor(world, tmp_path: Path):
    samples = write_samples(tmp_path / "s.npz", real_images(300))
    result = run_in(tmp_path, world, samples)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result.metrics))
    assert set(metrics) >= METRIC_KEYS and set(metrics["floor"]) == METRIC_KEYS
    assert set(metrics["kid"]) == {"mean", "std"} == set(metrics["inception_score"])
    assert list(metrics["class_shares"]) == list(classifier.CLASS_NAMES)
    assert sum(metrics["class_shares"].values()) == pytest.approx(1.0)
    assert metrics["setup"] == {
        "samples": 300,
        "reference": "test split, 500 images",
        "floor_images": 400,
        "feature_network": f"{world[0]}:features",
        "feature_dim": 128,
        "classifier": str(world[0]),
        "nearest_k": 3,
        "kid_subsets": 10,
        "kid_subset_size": 200,
        "score_splits": 10,
    }

    histogram = json.loads((tmp_path / "class_histogram.json").read_text())
    assert [row["class"] for row in histogram] == list(classifier.CLASS_NAMES)
    assert all(set(row) == {"class", "generated", "real"} for row in histogram)

    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape[0] == 10 * (28 * 2 + 2) + 2  # one row per class
    assert grid.shape[1] > evaluate.GRID_PER_CLASS * (28 * 2 + 2)  # plus the labels


def test_same_inputs_give_identical_metrics(world, tmp_path: Path):
    samples = write_samples(tmp_path / "s.npz", real_images(200))
    run_in(tmp_path / "a", world, samples)
    run_in(tmp_path / "b", world, samples)
    for name in ("metrics.json", "class_histogram.json", "grid.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_another_feature_network_can_be_plugged_in(world, tmp_path: Path):
    """Any Keras model reading pixels 0..255: here an RGB one of another input size (as
    InceptionV3 is), read at its output; the class figures still come from the classifier."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((36, 36, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = keras.layers.Conv2D(24, 3, strides=2, activation="relu")(x)
    outputs = keras.layers.GlobalAveragePooling2D()(x)
    network = tmp_path / "other.keras"
    keras.Model(inputs, outputs).save(network)

    samples = write_samples(tmp_path / "s.npz", real_images(200))
    cfg = config(feature_model=str(network), feature_layer="")
    result = run_in(tmp_path, world, samples, cfg)
    assert result.metrics["setup"]["feature_network"] == f"{network}:output"
    assert result.metrics["setup"]["feature_dim"] == 24
    default = run_in(tmp_path / "default", world, samples)
    assert result.metrics["fid"] != default.metrics["fid"]
    assert result.metrics["class_shares"] == default.metrics["class_shares"]


def test_bad_inputs_are_named(world, tmp_path: Path):
    model, data = world
    with pytest.raises(evaluate.EvaluateError, match="no samples; run `dvc repro generate`"):
        run_in(tmp_path, world, tmp_path / "missing.npz")

    floats = tmp_path / "floats.npz"
    np.savez(floats, images=np.zeros((10, 28, 28), np.float32))
    with pytest.raises(evaluate.EvaluateError, match=r"must be uint8 \[N, 28, 28\], got float32"):
        run_in(tmp_path, world, floats)

    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, images=np.array([{"a": 1}], dtype=object))
    with pytest.raises(evaluate.EvaluateError, match="not a readable .npz file"):
        run_in(tmp_path, world, pickled)

    few = write_samples(tmp_path / "few.npz", real_images(3))
    with pytest.raises(evaluate.EvaluateError, match="nearest_k = 3 needs at least 4"):
        run_in(tmp_path, world, few)

    samples = write_samples(tmp_path / "s.npz", real_images(50))
    with pytest.raises(evaluate.EvaluateError, match="no layer named 'pool5'.*its layers: pixels"):
        run_in(tmp_path, world, samples, config(feature_model=str(model), feature_layer="pool5"))

    unvalidated = (model, ValidatedData(data.dataset_dir, tmp_path / "no-summary.json"))
    with pytest.raises(UnvalidatedDataError, match="has not been validated"):
        run_in(tmp_path, unvalidated, samples)
    assert not (tmp_path / "metrics.json").exists()


def test_the_command_line_prints_figures_beside_floors(world, tmp_path: Path):
    model, data = world
    samples = write_samples(tmp_path / "s.npz", real_images(200))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"evaluate": EVALUATE}))
    completed = subprocess.run(
        [sys.executable, "-m", "components.evaluate", "--params", str(params),
         "--samples", str(samples), "--classifier", str(model),
         "--dataset-dir", str(data.dataset_dir), "--summary", str(data.summary),
         "--metrics", str(tmp_path / "m.json"), "--histogram", str(tmp_path / "h.json"),
         "--class-grid", str(tmp_path / "g.png")],
        cwd=REPO_ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert "evaluate: FID" in completed.stdout and "real data" in completed.stdout
    assert (tmp_path / "m.json").is_file()

    assert_stage_refuses_params(
        "evaluate", {"evaluate": {"nearest_k": 0}},
        "evaluate.nearest_k: Input should be greater than or equal to 1", tmp_path,
    )  # fmt: skip
