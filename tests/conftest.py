"""Shared fixtures: tiny IDX mirrors written by the tests themselves."""

from __future__ import annotations

import gzip
import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from components.idx import IMAGES_MAGIC, LABELS_MAGIC, IdxFile, SourceSpec, Split

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
