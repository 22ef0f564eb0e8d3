"""End to end on the real data: `dvc repro` in a fresh git clone (ingest, the validation
gate, then a short training run with a small model), the outputs read back, and the gate
stopping bad data before training.

Needs Debian's dataset-fashion-mnist mirror (`make test` installs it when it can).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow_datasets as tfds
import yaml
from PIL import Image

from tests.conftest import (
    GIT,
    MIRROR,
    clone_working_tree,
    real_sample,
    require_mirror,
    snapshot,
    use_smoke_params,
    write_tfds,
)

pytestmark = pytest.mark.integration


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    completed = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert completed.returncode == 0, (
        f"{' '.join(cmd)} failed ({completed.returncode}):\n{completed.stdout}\n{completed.stderr}"
    )
    return completed


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    require_mirror()
    root = tmp_path_factory.mktemp("e2e")
    clone = clone_working_tree(root / "clone")
    use_smoke_params(clone)
    home = root / "home"  # the default DVC remote lives under ~: keep it in the sandbox
    home.mkdir()
    env = {
        **os.environ,
        "HOME": str(home),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    return clone, env


STAGES = ("ingest", "validate", "classifier", "train", "generate", "evaluate")


def timed_repro(clone: Path, env: dict[str, str], label: str) -> subprocess.CompletedProcess:
    started = time.perf_counter()
    completed = run(["dvc", "repro"], clone, env)
    print(f"{label}: {time.perf_counter() - started:.1f} s")
    return completed


@pytest.fixture(scope="module")
def reproduced(workspace) -> tuple[Path, dict[str, str]]:
    clone, env = workspace
    completed = timed_repro(clone, env, "dvc repro")
    for stage in STAGES:
        assert f"Running stage '{stage}'" in completed.stdout
    return clone, env


def test_the_real_dataset_passes_validation(reproduced):
    clone, _ = reproduced
    report = clone / "reports" / "validation"
    summary = json.loads((report / "summary.json").read_text())
    assert summary["passed"] is True and summary["failed"] == []
    assert summary["checks_evaluated"] == 27
    assert summary["counts"]["train"]["per_class"] == [6000] * 10
    assert summary["counts"]["test"]["per_class"] == [1000] * 10
    assert summary["counts"]["train"]["duplicate_images"] == 0
    assert summary["counts"]["test"]["duplicate_images"] == 0
    assert summary["counts"]["test"]["also_in_train"] == 0
    assert summary["profile"]["train"] == {"pixel_mean": 72.9404, "pixel_std": 90.0212}
    assert (report / "data_docs" / "index.html").is_file()
    assert json.loads((report / "results.json").read_text())["success"] is True


def test_repro_ingest_writes_the_full_dataset_readable_by_tfds(reproduced):
    clone, _ = reproduced
    data_dir = clone / "data"
    builder = tfds.builder("fashion_mnist", data_dir=str(data_dir))
    assert builder.info.features["label"].num_classes == 10
    splits = tfds.as_numpy(tfds.load("fashion_mnist", data_dir=str(data_dir), batch_size=-1))
    train, test = splits["train"], splits["test"]
    assert train["image"].shape == (60_000, 28, 28, 1) and train["image"].dtype == np.uint8
    assert test["image"].shape == (10_000, 28, 28, 1)
    assert np.bincount(train["label"], minlength=10).tolist() == [6000] * 10
    assert np.bincount(test["label"], minlength=10).tolist() == [1000] * 10
    # The measured profile of the real data (shared/facts.md): a sanity check of the pixels.
    assert train["image"].mean() == pytest.approx(72.94, abs=0.01)


def test_repro_trains_a_generator_on_the_validated_data(reproduced):
    clone, env = reproduced
    generator = keras.saving.load_model(clone / "models" / "generator.keras", safe_mode=True)
    assert generator.output_shape == (None, 28, 28, 1)
    history = json.loads((clone / "models" / "checkpoints" / "history.json").read_text())
    assert [record["epoch"] for record in history] == [1]
    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], clone, env).stdout)
    train_metrics = next(iter(metrics.values()))["data"]["reports/train/metrics.json"]["data"]
    assert set(train_metrics["train"]) >= {"g_loss", "d_loss", "d_real", "d_fake"}
    # The loss curves and the progress frames are DVC plots.
    rendered = clone.parent / "plots-rendered"  # outside the workspace: git stays clean
    shown = run(["dvc", "plots", "show", "--json", "-o", str(rendered)], clone, env).stdout
    plots = json.loads(shown)["data"]
    assert {"Losses", "Discriminator outputs", "Throughput"} <= set(plots)
    assert any("progress/epoch_0001.png" in name for name in plots)


METRIC_KEYS = {
    "fid", "kid", "inception_score", "precision", "recall", "density", "coverage",
    "class_entropy_bits", "class_entropy_normalized", "smallest_class_share",
    "classes_present", "class_shares",
}  # fmt: skip


def test_repro_generates_samples_and_evaluates_them_beside_the_floor(reproduced):
    clone, env = reproduced
    with np.load(clone / "samples" / "samples.npz", allow_pickle=False) as archive:
        images = archive["images"]
    assert images.dtype == np.uint8 and images.shape == (2000, 28, 28)

    # grid.png (4x) shows the same images as training's last frame (2x): the same batch.
    grid = np.asarray(Image.open(clone / "samples" / "grid.png"))
    frame = np.asarray(
        Image.open(clone / "reports/train/plots/images/progress/epoch_0001.png").convert("L")
    )
    cells_grid = [grid[2 + r * 114 : 2 + r * 114 + 112 : 4, 2 + c * 114 : 2 + c * 114 + 112 : 4]
                  for r in range(4) for c in range(4)]  # fmt: skip
    cells_frame = [frame[2 + r * 58 : 2 + r * 58 + 56 : 2, 2 + c * 58 : 2 + c * 58 + 56 : 2]
                   for r in range(4) for c in range(4)]  # fmt: skip
    assert all(np.array_equal(a, b) for a, b in zip(cells_grid, cells_frame, strict=True))
    assert Image.open(clone / "samples" / "progress.gif").n_frames == 1

    classifier = json.loads((clone / "reports" / "classifier.json").read_text())
    assert classifier["train_examples"] == 5000 and classifier["test_accuracy"] > 0.6
    metrics = json.loads((clone / "reports" / "metrics.json").read_text())
    assert set(metrics) >= METRIC_KEYS and set(metrics["floor"]) == METRIC_KEYS
    assert metrics["setup"]["samples"] == 2000 and metrics["setup"]["floor_images"] == 2000
    assert metrics["setup"]["reference"] == "test split, 10000 images"
    # One epoch of a tiny GAN is far from real data; real data is close to the test split.
    assert metrics["fid"] > 5 * metrics["floor"]["fid"]
    assert metrics["floor"]["precision"] > 0.6 and metrics["floor"]["recall"] > 0.6

    shown = json.loads(run(["dvc", "metrics", "show", "--json"], clone, env).stdout)
    files = next(iter(shown.values()))["data"]
    assert files["reports/metrics.json"]["data"]["fid"] == metrics["fid"]
    assert "test_accuracy" in files["reports/classifier.json"]["data"]

    rendered = clone.parent / "plots-rendered-samples"
    plots = json.loads(
        run(["dvc", "plots", "show", "--json", "-o", str(rendered)], clone, env).stdout
    )["data"]
    for image in ("samples/grid.png", "samples/interpolation.png", "samples/progress.gif",
                  "reports/class_grid.png"):  # fmt: skip
        assert any(image in name for name in plots), (image, sorted(plots))
    assert any("class_histogram.json" in name for name in plots)


def test_plots_diff_shows_two_revisions_samples_side_by_side(reproduced, tmp_path: Path):
    clone, env = reproduced
    copy = tmp_path / "copy"
    shutil.copytree(clone, copy, symlinks=True)
    run([*GIT, "add", "dvc.lock"], copy, env)
    run([*GIT, "commit", "-q", "-m", "run A"], copy, env)
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["generate"]["interpolation_steps"] = 6
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    completed = run(["dvc", "repro"], copy, env)
    assert "Running stage 'generate'" in completed.stdout
    assert "Running stage 'train'" not in completed.stdout

    out = tmp_path / "diff"
    diff = json.loads(run(["dvc", "plots", "diff", "HEAD", "--json", "-o", str(out)], copy,
                          env).stdout)["data"]  # fmt: skip
    revisions = {
        entry["revisions"][0] for name, entries in diff.items()
        if name.endswith("samples/interpolation.png") for entry in entries
    }  # fmt: skip
    assert revisions == {"HEAD", "workspace"}
    sizes = {Image.open(entry["url"]).size for name, entries in diff.items()
             if name.endswith("samples/interpolation.png") for entry in entries}  # fmt: skip
    assert len(sizes) == 2  # 10 and 6 images per row: both revisions' own files


def test_outputs_are_versioned_by_dvc_not_git(reproduced):
    clone, env = reproduced
    status = run(["git", "status", "--porcelain"], clone, env).stdout.split("\n")
    changed = sorted(line[3:] for line in status if line)
    assert changed == ["dvc.lock"], changed  # the data itself is ignored by git
    lock = (clone / "dvc.lock").read_text()
    assert "data/fashion_mnist" in lock and "nfiles" in lock


def test_second_repro_does_nothing_and_says_so(reproduced):
    clone, env = reproduced
    marker = clone / "data" / "fashion_mnist" / "ingest.json"
    mtime = marker.stat().st_mtime_ns
    completed = timed_repro(clone, env, "no-op dvc repro")
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in completed.stdout
    assert "Data and pipelines are up to date." in completed.stdout
    assert marker.stat().st_mtime_ns == mtime


def test_push_and_pull_through_the_default_local_remote(reproduced):
    clone, env = reproduced
    run(["dvc", "push"], clone, env)
    remote = Path(env["HOME"]) / ".cache" / "dcgan-pipeline" / "dvc-remote"
    assert any(p.is_file() for p in remote.rglob("*")), "nothing arrived in the remote"

    # A second clone with nothing but git's files gets the data from the remote.
    other = clone_working_tree(clone.parent / "other")
    use_smoke_params(other)
    shutil.copy2(clone / "dvc.lock", other / "dvc.lock")
    run(["dvc", "pull"], other, env)
    for restored in (
        other / "data" / "fashion_mnist" / "3.0.1" / "dataset_info.json",
        other / "reports" / "validation" / "summary.json",
        other / "models" / "generator.keras",
        other / "models" / "checkpoints" / "history.json",
        other / "models" / "classifier.keras",
        other / "samples" / "samples.npz",
        other / "reports" / "metrics.json",
    ):
        assert restored.read_bytes() == (clone / restored.relative_to(other)).read_bytes()
    assert "up to date" in run(["dvc", "status"], other, env).stdout


def test_failed_repro_keeps_the_earlier_dataset(reproduced, tmp_path: Path):
    """A damaged mirror fails the stage, names the file, and the dataset stays as it was."""
    clone, env = reproduced
    dataset = clone / "data" / "fashion_mnist"
    before = snapshot(dataset)
    broken = tmp_path / "broken-mirror"
    shutil.copytree(MIRROR, broken)
    labels = broken / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:1000])
    params = clone / "params.yaml"
    original = params.read_text()
    params.write_text(original.replace(f"mirror_dir: {MIRROR}", f"mirror_dir: {broken}"))
    try:
        completed = subprocess.run(
            ["dvc", "repro"], cwd=clone, env=env, capture_output=True, text=True
        )
    finally:
        params.write_text(original)
    assert completed.returncode != 0
    assert f"{labels}: truncated gzip stream" in completed.stderr
    assert snapshot(dataset) == before
    assert "up to date" in run(["dvc", "status"], clone, env).stdout


def test_bad_data_stops_the_pipeline_before_training(reproduced, tmp_path: Path):
    """Data that fails validation never reaches `train`, which depends on summary.json.

    The bad data arrives as with a frozen ingest stage (data dropped in by hand or pulled
    from elsewhere); a running ingest would rebuild the good dataset instead.
    """
    clone, env = reproduced
    gate = tmp_path / "gate"
    shutil.copytree(clone, gate, symlinks=True)
    models_before = snapshot(gate / "models")

    run(["dvc", "freeze", "ingest"], gate, env)
    sample = real_sample(300, 100)
    sample.train_labels[3] = 10
    dataset = gate / "data" / "fashion_mnist" / "3.0.1"
    shutil.rmtree(dataset)
    write_tfds(tmp_path / "bad", sample).rename(dataset)
    before = snapshot(dataset)

    completed = subprocess.run(["dvc", "repro"], cwd=gate, env=env, capture_output=True, text=True)
    assert completed.returncode != 0
    assert "Running stage 'validate'" in completed.stdout
    assert "Running stage 'train'" not in completed.stdout
    assert snapshot(gate / "models") == models_before  # the model of the good data stays
    failed = [line for line in completed.stderr.splitlines() if "validate: FAILED" in line]
    assert any("labels_in_range" in line and "{index: 3, label: 10}" in line for line in failed)
    assert any("row_count: observed 300; expected 60000 rows" in line for line in failed)
    summary = json.loads((gate / "reports" / "validation" / "summary.json").read_text())
    assert summary["passed"] is False  # the report of the failure is there to read
    assert snapshot(dataset) == before  # validation never changes the data
    status = run(["dvc", "status"], gate, env).stdout
    assert "validate:" in status and "train:" in status  # neither recorded as done

    # Run by hand, the stage itself refuses the data that failed.
    by_hand = subprocess.run(
        [sys.executable, "-m", "components.train"], cwd=gate, env=env, capture_output=True,
        text=True,
    )  # fmt: skip
    assert by_hand.returncode == 1
    assert "the data failed validation (" in by_hand.stderr
    assert "train_examples: labels_in_range" in by_hand.stderr
    assert snapshot(gate / "models") == models_before
