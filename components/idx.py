"""Read and verify gzipped IDX files (the raw MNIST / Fashion-MNIST format) by their content.

Debian recompressed Fashion-MNIST's `.gz` files, so their bytes (and tfds's registered
checksums) no longer match the originals although the decompressed payload is the same.
We therefore verify what matters: the IDX header, the counts, the shape, the label range and
a SHA-256 of the *decompressed* payload. Every failure names the file and what is wrong.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# IDX magic: two zero bytes, a type code (0x08 = unsigned byte) and the number of dimensions.
IMAGES_MAGIC = 0x00000803  # uint8, 3 dims: [count, rows, cols]
LABELS_MAGIC = 0x00000801  # uint8, 1 dim:  [count]


class SourceError(ValueError):
    """A source file is missing or its content is not what we pinned."""


@dataclass(frozen=True)
class IdxFile:
    """What one IDX file must hold: its name, kind, example count and payload digest."""

    filename: str
    kind: str  # "images" or "labels"
    count: int
    sha256: str | None  # of the decompressed payload; None skips the digest check


@dataclass(frozen=True)
class Split:
    images: IdxFile
    labels: IdxFile


@dataclass(frozen=True)
class SourceSpec:
    """The expected content of a four-file IDX dataset (train and test, images and labels)."""

    train: Split
    test: Split
    num_classes: int = 10
    image_shape: tuple[int, int] = (28, 28)

    def files(self) -> tuple[IdxFile, ...]:
        return (self.train.images, self.train.labels, self.test.images, self.test.labels)


# Digests of the decompressed payloads (`zcat FILE | sha256sum`), computed from Debian's
# dataset-fashion-mnist 0.0~git20200523.55506a9-1 and identical to the ones public loaders
# pin for the files downloaded from zalandoresearch/fashion-mnist.
FASHION_MNIST = SourceSpec(
    train=Split(
        images=IdxFile(
            "train-images-idx3-ubyte.gz",
            "images",
            60_000,
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        ),
        labels=IdxFile(
            "train-labels-idx1-ubyte.gz",
            "labels",
            60_000,
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        ),
    ),
    test=Split(
        images=IdxFile(
            "t10k-images-idx3-ubyte.gz",
            "images",
            10_000,
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        ),
        labels=IdxFile(
            "t10k-labels-idx1-ubyte.gz",
            "labels",
            10_000,
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        ),
    ),
)


def _decompress(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise SourceError(f"{path}: file is missing") from None
    except EOFError:
        raise SourceError(f"{path}: truncated gzip stream (the file was cut short)") from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise SourceError(f"{path}: not a valid gzip file ({exc})") from None


def read_idx(path: Path, expected: IdxFile, spec: SourceSpec) -> np.ndarray:
    """Return the array in a gzipped IDX file after checking it against `expected`.

    Images come back as uint8 [count, rows, cols], labels as uint8 [count].
    """
    payload = _decompress(path)
    is_images = expected.kind == "images"
    header_size = 16 if is_images else 8
    if len(payload) < header_size:
        raise SourceError(f"{path}: {len(payload)} bytes is too short for an IDX header")

    magic, count = struct.unpack(">II", payload[:8])
    want_magic = IMAGES_MAGIC if is_images else LABELS_MAGIC
    if magic != want_magic:
        raise SourceError(
            f"{path}: wrong IDX magic number 0x{magic:08x}, expected 0x{want_magic:08x} "
            f"(uint8 {expected.kind})"
        )
    if count != expected.count:
        raise SourceError(f"{path}: header says {count} {expected.kind}, expected {expected.count}")

    shape: tuple[int, ...] = (count,)
    if is_images:
        rows, cols = struct.unpack(">II", payload[8:16])
        if (rows, cols) != spec.image_shape:
            raise SourceError(
                f"{path}: images are {rows}x{cols}, expected "
                f"{spec.image_shape[0]}x{spec.image_shape[1]}"
            )
        shape = (count, rows, cols)

    body = payload[header_size:]
    want_bytes = int(np.prod(shape))
    if len(body) != want_bytes:
        raise SourceError(
            f"{path}: payload holds {len(body)} bytes, the header promises {want_bytes}"
        )
    array = np.frombuffer(body, dtype=np.uint8).reshape(shape)

    if not is_images:
        top = int(array.max(initial=0))
        if top >= spec.num_classes:
            bad = int(np.count_nonzero(array >= spec.num_classes))
            raise SourceError(
                f"{path}: {bad} label(s) out of range (max {top}), "
                f"expected 0..{spec.num_classes - 1}"
            )

    if expected.sha256 is not None:
        digest = hashlib.sha256(payload).hexdigest()
        if digest != expected.sha256:
            raise SourceError(
                f"{path}: content differs from the pinned dataset "
                f"(sha256 of the decompressed payload {digest}, expected {expected.sha256})"
            )
    return array
