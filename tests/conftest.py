"""Shared fixtures: tiny IDX mirrors and tfds datasets written by the tests themselves."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
import yaml

from components import ingest
from components.idx import (
    FASHION_MNIST,
    IMAGES_MAGIC,
    LABELS_MAGIC,
    IdxFile,
    SourceSpec,
    Split,
    read_idx,
)
from components.images import png_bytes
from components.validate import dataset_fingerprint

REPO_ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes, to show that nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode uint8 images [N, H, W] or labels [N] in the IDX format."""
    if array.ndim == 3:
        return struct.pack(">IIII", IMAGES_MAGIC, *array.shape) + array.tobytes()
    return struct.pack(">II", LABELS_MAGIC, array.shape[0]) + array.tobytes()


def write_gz(path: Path, payload: bytes) -> None:
    path.write_bytes(gzip.compress(payload))


@dataclass
class TinyMirror:
    dir: Path
    spec: SourceSpec
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray

    def path(self, filename: str) -> Path:
        return self.dir / filename


def make_tiny_mirror(root: Path, n_train: int = 40, n_test: int = 20, seed: int = 0) -> TinyMirror:
    """Four valid IDX files with every class present, plus a spec pinning their digests."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": (np.arange(n_test) % 10).astype(np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, array in arrays.items():
        payload = idx_bytes(array)
        write_gz(root / name, payload)
        kind = "images" if array.ndim == 3 else "labels"
        files[name] = IdxFile(name, kind, array.shape[0], hashlib.sha256(payload).hexdigest())
    spec = SourceSpec(
        train=Split(files["train-images-idx3-ubyte.gz"], files["train-labels-idx1-ubyte.gz"]),
        test=Split(files["t10k-images-idx3-ubyte.gz"], files["t10k-labels-idx1-ubyte.gz"]),
    )
    return TinyMirror(root, spec, *arrays.values())


@pytest.fixture
def tiny_mirror(tmp_path: Path) -> TinyMirror:
    return make_tiny_mirror(tmp_path / "mirror")


MIRROR = Path("/usr/share/datasets/fashion-mnist")


def require_mirror() -> Path:
    """The real Fashion-MNIST mirror, or a failure that says how to install it."""
    if not all((MIRROR / f.filename).is_file() for f in FASHION_MNIST.files()):
        pytest.fail(
            f"the Fashion-MNIST mirror is missing from {MIRROR}: "
            "run `make test` (it installs it) or `apt-get install dataset-fashion-mnist`"
        )
    return MIRROR


@dataclass
class Splits:
    """Images (each [H, W] uint8) and labels of a train and a test split, to write as tfds."""

    train_images: list[np.ndarray]
    train_labels: np.ndarray
    test_images: list[np.ndarray]
    test_labels: np.ndarray

    def copy(self) -> Splits:
        return Splits(
            [i.copy() for i in self.train_images],
            self.train_labels.copy(),
            [i.copy() for i in self.test_images],
            self.test_labels.copy(),
        )


def real_sample(n_train: int, n_test: int) -> Splits:
    """The first examples of the real data (verified against the pinned digests)."""
    mirror = require_mirror()
    spec = FASHION_MNIST

    def read(idx_file: IdxFile) -> np.ndarray:
        return read_idx(mirror / idx_file.filename, idx_file, spec).copy()  # writable

    return Splits(
        list(read(spec.train.images)[:n_train]),
        read(spec.train.labels)[:n_train],
        list(read(spec.test.images)[:n_test]),
        read(spec.test.labels)[:n_test],
    )


def write_tfds(root: Path, splits: Splits, image_shape=(28, 28, 1)) -> Path:
    """Write `splits` as a prepared tfds dataset (features as ingest writes them, with
    `image_shape` declared); return its folder, as `data/fashion_mnist/3.0.1` is."""
    features = tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=image_shape),
            # A label beyond 0..9 needs a wider label feature to be written at all.
            "label": tfds.features.ClassLabel(
                num_classes=max(10, int(splits.train_labels.max()) + 1)
            ),
        }
    )

    def examples(images, labels):
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield index, {"image": png_bytes(image), "label": int(label)}

    tfds.disable_progress_bar()
    with contextlib.redirect_stdout(io.StringIO()):
        tfds.dataset_builders.store_as_tfds_dataset(
            name=ingest.TFDS_NAME,
            version=ingest.TFDS_VERSION,
            features=features,
            split_datasets={
                "train": examples(splits.train_images, splits.train_labels),
                "test": examples(splits.test_images, splits.test_labels),
            },
            data_dir=root,
            disable_shuffling=True,
            download_config=tfds.download.DownloadConfig(try_download_gcs=False),
        )
    return root / ingest.TFDS_NAME / ingest.TFDS_VERSION


@dataclass(frozen=True)
class ValidatedData:
    dataset_dir: Path
    summary: Path


def validated_data(root: Path, n_train: int, n_test: int = 20) -> ValidatedData:
    """The first real examples as a tfds dataset, with the summary.json a passed validation
    writes for it (passed, and this dataset's fingerprint): the train stage's inputs."""
    dataset_dir = write_tfds(root / "data", real_sample(n_train, n_test))
    summary = root / "summary.json"
    summary.write_text(
        json.dumps({"passed": True, "dataset_fingerprint": dataset_fingerprint(dataset_dir)})
    )
    return ValidatedData(dataset_dir, summary)


def assert_stage_refuses_params(stage: str, params: dict, message: str, tmp_path: Path) -> None:
    """`python -m components.<stage> --params P` with bad params exits 1, naming the key."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    completed = subprocess.run(
        [sys.executable, "-m", f"components.{stage}", "--params", str(path)],
        cwd=REPO_ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert completed.returncode == 1, completed.stdout
    assert message in completed.stderr, completed.stderr


GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]


def clone_working_tree(dest: Path) -> Path:
    """`git clone` of this repository, plus its uncommitted changes committed on top.

    In CI the checkout is clean and this is a plain clone; while developing, the clone
    still tests the files as they are in the working tree.
    """
    subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(dest)], check=True)
    changed = subprocess.run(
        ["git", "ls-files", "-z", "--modified", "--deleted", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for rel in sorted(set(filter(None, changed.split("\0")))):
        source, target = REPO_ROOT / rel, dest / rel
        if source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        else:
            target.unlink(missing_ok=True)
    subprocess.run([*GIT, "add", "-A"], cwd=dest, check=True)
    if subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=dest).returncode:
        subprocess.run([*GIT, "commit", "-q", "-m", "working-tree changes"], cwd=dest, check=True)
    return dest


# One epoch of the full 60000 images with a model small enough to take seconds; a
# classifier from 5000 images; the evaluation on 2000 samples.
SMOKE = {
    "train": {
        "epochs": 1,
        "generator_width": 16,
        "discriminator_width": 8,
        "latent_dim": 16,
        "grid_size": 16,
    },
    "classifier": {"train_limit": 5000, "epochs": 1, "min_test_accuracy": 0.6},
    "generate": {"num_samples": 2000},
    "evaluate": {"real_images": 2000, "kid_subsets": 20, "kid_subset_size": 500},
}


def use_smoke_params(clone: Path, sections: dict[str, dict] = SMOKE) -> None:
    """Commit smoke params in the clone, so that git sees only DVC's own changes."""
    params = yaml.safe_load((clone / "params.yaml").read_text())
    for section, keys in sections.items():
        params[section].update(keys)
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run([*GIT, "commit", "-q", "-am", "smoke params"], cwd=clone, check=True)
