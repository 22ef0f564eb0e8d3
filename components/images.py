"""Greyscale images to PNG and GIF bytes, sample grids and text labels; no TensorFlow."""

from __future__ import annotations

import io
import math
import struct
import zlib
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Text drawn onto images (epoch captions, class names): Pillow's built-in scalable font,
# so no font file has to exist on the machine and the pixels are the same everywhere.
FONT_SIZE = 14
TEXT_BAND = 22  # pixels of height for one line of text


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


def image_grid(
    images: np.ndarray, scale: int = 2, gap: int = 2, cols: int | None = None
) -> np.ndarray:
    """uint8 [N, H, W] (or [N, H, W, 1]) -> one [rows*(H+gap)+gap, ...] uint8 grid image.

    `cols` columns (default: square-ish, ceil(sqrt(N))), each image enlarged `scale` times
    by pixel repetition so that 28x28 garments can be judged by eye, on a mid-grey
    background.
    """
    if images.ndim == 4:
        assert images.shape[-1] == 1, images.shape
        images = images[..., 0]
    assert images.ndim == 3 and images.dtype == np.uint8, (images.shape, images.dtype)
    count, height, width = images.shape
    cols = cols or math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    cell_h, cell_w = height * scale + gap, width * scale + gap
    grid = np.full((rows * cell_h + gap, cols * cell_w + gap), 128, dtype=np.uint8)
    big = images.repeat(scale, axis=1).repeat(scale, axis=2)
    for index in range(count):
        top, left = gap + (index // cols) * cell_h, gap + (index % cols) * cell_w
        grid[top : top + height * scale, left : left + width * scale] = big[index]
    return grid


def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=FONT_SIZE)


def with_caption(image: np.ndarray, text: str) -> np.ndarray:
    """uint8 [H, W] -> [TEXT_BAND + H, W]: `text` in white on a black band above the image."""
    assert image.ndim == 2 and image.dtype == np.uint8, (image.shape, image.dtype)
    canvas = Image.new("L", (image.shape[1], TEXT_BAND + image.shape[0]), 0)
    canvas.paste(Image.fromarray(image), (0, TEXT_BAND))
    ImageDraw.Draw(canvas).text((4, 3), text, fill=255, font=_font())
    return np.asarray(canvas)


def with_row_labels(grid: np.ndarray, labels: Sequence[str], cell: int, gap: int) -> np.ndarray:
    """A grid (rows of `cell`-pixel images, `gap` apart) with a label left of each row."""
    assert grid.ndim == 2 and grid.dtype == np.uint8, (grid.shape, grid.dtype)
    font = _font()
    width = 8 + max(int(font.getlength(label)) for label in labels)
    canvas = Image.new("L", (width + grid.shape[1], grid.shape[0]), 0)
    canvas.paste(Image.fromarray(grid), (width, 0))
    draw = ImageDraw.Draw(canvas)
    for row, label in enumerate(labels):
        middle = gap + row * (cell + gap) + cell // 2
        draw.text((4, middle), label, fill=255, font=font, anchor="lm")
    return np.asarray(canvas)


def gif_bytes(frames: Sequence[np.ndarray], frame_ms: int, last_frame_ms: int) -> bytes:
    """An endlessly looping greyscale GIF of same-sized uint8 [H, W] frames."""
    assert frames and all(f.shape == frames[0].shape for f in frames), [f.shape for f in frames]
    images = [Image.fromarray(frame, mode="L") for frame in frames]
    durations = [frame_ms] * (len(images) - 1) + [last_frame_ms]
    buffer = io.BytesIO()
    images[0].save(
        buffer, format="GIF", save_all=True, append_images=images[1:], duration=durations,
        loop=0, optimize=False,
    )  # fmt: skip
    return buffer.getvalue()


def pad_to(image: np.ndarray, height: int, width: int, fill: int = 128) -> np.ndarray:
    """uint8 [h, w] placed top-left on a [height, width] canvas of `fill`."""
    canvas = np.full((height, width), fill, dtype=np.uint8)
    canvas[: image.shape[0], : image.shape[1]] = image
    return canvas
