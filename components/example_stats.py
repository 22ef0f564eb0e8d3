"""One row of statistics per image of a tfds image-classification dataset.

`read_example_stats` reads each split through tensorflow-datasets, exactly as training will,
and returns a table per split with, for every example: its index, label, image height,
width, channels and dtype, the min, max, mean and std of its pixels, and a SHA-256 of its
content (shape, dtype and pixels), which finds exact duplicates within and across splits.

Nothing here judges the data; `components.validate` does, with Great Expectations.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import pickle
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow_datasets as tfds  # cheap: TensorFlow itself loads on first use

from components.cli import setup_logging

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
COLUMNS = (
    "split",
    "index",
    "label",
    "height",
    "width",
    "channels",
    "dtype",
    "min",
    "max",
    "mean",
    "std",
    "hash",
)
# Big enough that per-batch overhead vanishes, small enough that a batch of 28x28 images
# in float64 (for the statistics) stays around 25 MB.
BATCH_SIZE = 4096


class DatasetError(ValueError):
    """The dataset cannot be read as an image-classification dataset; says what is wrong."""


def require_prepared(dataset_dir: Path) -> None:
    """Fail at once, before any expensive import, when the folder holds no tfds dataset."""
    if not (Path(dataset_dir) / "dataset_info.json").is_file():
        raise DatasetError(
            f"{dataset_dir}: no prepared tfds dataset here (dataset_info.json is missing); "
            "run the ingest stage first: dvc repro ingest"
        )


def open_dataset(dataset_dir: Path) -> tfds.core.DatasetBuilder:
    """The tfds builder of a prepared dataset folder, checked for the features we read."""
    require_prepared(dataset_dir)
    builder = tfds.builder_from_directory(str(dataset_dir))
    features = builder.info.features
    missing = [key for key in ("image", "label") if key not in features]
    if missing:
        raise DatasetError(
            f"{dataset_dir}: the dataset has no {' or '.join(missing)} feature "
            f"(it has: {', '.join(features.keys())})"
        )
    absent = [split for split in SPLITS if split not in builder.info.splits]
    if absent:
        raise DatasetError(
            f"{dataset_dir}: the dataset has no {' or '.join(absent)} split "
            f"(it has: {', '.join(builder.info.splits.keys())})"
        )
    return builder


def batch_stats(images: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray | list]:
    """Statistics of a batch of same-shaped images [B, H, W, C] and their labels [B]."""
    assert images.ndim == 4, f"expected images [B, H, W, C], got shape {images.shape}"
    assert labels.shape == (images.shape[0],), (labels.shape, images.shape)
    count, height, width, channels = images.shape
    flat = images.reshape(count, -1)
    # The hash covers shape and dtype as well as the bytes, so that equal bytes in a
    # different layout are not called duplicates.
    prefix = f"{height}x{width}x{channels}:{images.dtype}|".encode()
    return {
        "label": labels.astype(np.int64),
        "height": np.full(count, height, dtype=np.int64),
        "width": np.full(count, width, dtype=np.int64),
        "channels": np.full(count, channels, dtype=np.int64),
        "dtype": [str(images.dtype)] * count,
        "min": flat.min(axis=1).astype(np.float64),
        "max": flat.max(axis=1).astype(np.float64),
        "mean": flat.mean(axis=1, dtype=np.float64),
        "std": flat.std(axis=1, dtype=np.float64),
        "hash": [hashlib.sha256(prefix + row.tobytes()).hexdigest() for row in flat],
    }


def _batches_as_declared(builder, split: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches decoded by tfds itself: the fast path, when every image has the declared shape."""
    dataset = builder.as_dataset(split=split, shuffle_files=False, batch_size=BATCH_SIZE)
    for batch in tfds.as_numpy(dataset):
        yield batch["image"], batch["label"]


def _examples_as_stored(builder, split: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One example at a time, each image decoded at the shape it was stored with.

    tfds refuses (rightly, for training) an image whose shape differs from the declared
    one; to report such images rather than crash on them, decode the stored bytes here.
    """
    import tensorflow as tf

    dtype = builder.info.features["image"].tf_dtype
    dataset = builder.as_dataset(
        split=split,
        shuffle_files=False,
        decoders={"image": tfds.decode.SkipDecoding()},
    ).map(
        lambda ex: (
            tf.io.decode_image(ex["image"], dtype=dtype, expand_animations=False),
            ex["label"],
        ),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    for image, label in tfds.as_numpy(dataset):
        yield image[np.newaxis], np.asarray([label])


def _split_table(builder, split: str) -> pd.DataFrame:
    import tensorflow as tf

    declared = builder.info.features["image"].shape
    parts = None
    try:
        if all(dim is not None for dim in declared):
            try:
                parts = [batch_stats(*batch) for batch in _batches_as_declared(builder, split)]
            except tf.errors.OpError as exc:
                # An image of another shape than declared breaks tfds's batching (as an
                # invalid argument or a failed padding, depending on where it sits).
                log.warning(
                    "%s: cannot batch the images at the declared shape %s (%s); reading the "
                    "examples one by one to report each",
                    split,
                    declared,
                    _first_line(exc),
                )
        if parts is None:  # shapes may differ from image to image
            parts = [batch_stats(*example) for example in _examples_as_stored(builder, split)]
    except tf.errors.OpError as exc:  # damaged shards, undecodable images
        raise DatasetError(f"{split} split: cannot read the examples: {_first_line(exc)}") from None
    return _table(split, parts)


def _first_line(exc) -> str:
    return str(getattr(exc, "message", exc)).strip().splitlines()[0][:300]


def _table(split: str, parts: list[dict]) -> pd.DataFrame:
    names = COLUMNS[2:]  # all but split and index
    if parts:
        table = pd.DataFrame(
            {name: np.concatenate([np.asarray(p[name]) for p in parts]) for name in names}
        )
    else:  # an empty split
        table = pd.DataFrame(columns=list(names))
    table.insert(0, "index", np.arange(len(table), dtype=np.int64))
    table.insert(0, "split", split)
    return table


def read_example_stats(dataset_dir: Path) -> dict[str, pd.DataFrame]:
    """A statistics table (columns `COLUMNS`) per split of the tfds dataset in `dataset_dir`."""
    builder = open_dataset(Path(dataset_dir))
    tfds.disable_progress_bar()
    return {split: _split_table(builder, split) for split in SPLITS}


def read_split(
    dataset_dir: Path, split: str, count: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 28, 28] and labels int64 [N] of a split (its first `count` only,
    when given), in stored order, through tfds (for the stages that use the data)."""
    builder = open_dataset(Path(dataset_dir))
    total = builder.info.splits[split].num_examples
    selection = split if count is None or count >= total else f"{split}[:{count}]"
    tfds.disable_progress_bar()
    batch = tfds.as_numpy(builder.as_dataset(split=selection, batch_size=-1, shuffle_files=False))
    images, labels = batch["image"], batch["label"].astype(np.int64)
    assert images.ndim == 4 and images.shape[-1] == 1, images.shape
    return images[..., 0], labels


def main(argv: list[str] | None = None) -> int:
    """`python -m components.example_stats DATASET_DIR OUT`: the tables, pickled to OUT.

    The validate stage runs this in a child process, so that TensorFlow loads and decodes
    the images there while the stage itself loads Great Expectations. OUT receives
    {"tables": {...}} or, when the dataset cannot be read, {"error": "..."}.
    """
    parser = argparse.ArgumentParser(prog="python -m components.example_stats")
    parser.add_argument("dataset_dir", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    setup_logging(logging.WARNING)  # the parent stage reports; only warnings from here
    try:
        payload: dict = {"tables": read_example_stats(args.dataset_dir)}
    except DatasetError as exc:
        payload = {"error": str(exc)}
    args.out.write_bytes(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
    return 0


if __name__ == "__main__":
    sys.exit(main())
