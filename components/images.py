"""Greyscale images to PNG bytes, and sample grids; no TensorFlow needed."""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png_bytes(image: np.ndarray) -> bytes:
    """One [H, W] uint8 image as 8-bit grey PNG bytes.

    tfds stores images as PNG. Given arrays it encodes each through a TF graph call (and
    Pillow spends most of its time in per-call machinery); for 70k tiny images a direct
    encoder is several times faster. The round trip is pinned by tests. The output depends
    only on the pixels (no timestamps), so equal images give equal files.
    """
    assert image.ndim == 2 and image.dtype == np.uint8, (image.shape, image.dtype)
    height, width = image.shape
    rows = np.zeros((height, width + 1), dtype=np.uint8)  # a leading 0 = filter "None"
    rows[:, 1:] = image
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8 bit, greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
        + _png_chunk(b"IEND", b"")
    )


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Generator output in [-1, 1] (any shape) -> uint8 pixels in [0, 255]."""
    return np.clip(np.rint((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, scale: int = 2, gap: int = 2) -> np.ndarray:
    """uint8 [N, H, W] (or [N, H, W, 1]) -> one [rows*(H+gap)+gap, ...] uint8 grid image.

    Square-ish (ceil(sqrt(N)) columns), each image enlarged `scale` times by pixel
    repetition so that 28x28 garments can be judged by eye, on a mid-grey background.
    """
    if images.ndim == 4:
        assert images.shape[-1] == 1, images.shape
        images = images[..., 0]
    assert images.ndim == 3 and images.dtype == np.uint8, (images.shape, images.dtype)
    count, height, width = images.shape
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    cell_h, cell_w = height * scale + gap, width * scale + gap
    grid = np.full((rows * cell_h + gap, cols * cell_w + gap), 128, dtype=np.uint8)
    big = images.repeat(scale, axis=1).repeat(scale, axis=2)
    for index in range(count):
        top, left = gap + (index // cols) * cell_h, gap + (index % cols) * cell_w
        grid[top : top + height * scale, left : left + width * scale] = big[index]
    return grid
