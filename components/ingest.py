"""Stage `ingest`: Fashion-MNIST from the local mirror (or tfds's download) into tfds format.

Sources, in order:
1. `data.mirror_dir` holding the four raw IDX `.gz` files (Debian's dataset-fashion-mnist),
   checked by content against the digests pinned in `components.idx`;
2. tensorflow-datasets' own download of `fashion_mnist` (its registered URLs and checksums),
   then the same content checks.

The result, `data/fashion_mnist/3.0.1/`, has the features of tfds's `fashion_mnist` and reads
back with `tfds.builder_from_directory` or `tfds.load("fashion_mnist", data_dir="data")`.
It is built in a scratch folder beside the output and moved into place only when complete,
so a failed run leaves an earlier output as it was.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import tensorflow_datasets as tfds  # cheap: TensorFlow itself loads on first use

from components.atomic import recover_interrupted, replace_dir, scratch_beside
from components.cli import setup_logging, stage_parser
from components.config import ConfigError, DataConfig, load_config
from components.idx import FASHION_MNIST, SourceError, SourceSpec, read_idx
from components.images import png_bytes

log = logging.getLogger("ingest")

DEFAULT_OUT_DIR = Path("data/fashion_mnist")
TFDS_NAME = "fashion_mnist"
TFDS_VERSION = "3.0.1"  # the version of tfds's own fashion_mnist builder
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# The shape of every image the dataset holds: height, width, channels (greyscale).
IMAGE_SHAPE = (28, 28, 1)
# A stalled connection must fail, not hang the pipeline.
NETWORK_TIMEOUT_S = 30
PROVENANCE_FILE = "ingest.json"


@dataclass(frozen=True)
class FashionMnistArrays:
    """Verified arrays in source order: images uint8 [N, 28, 28], labels uint8 [N]."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


@dataclass(frozen=True)
class IngestResult:
    out_dir: Path
    source: str  # "mirror" or "tfds-download"
    location: str  # the mirror folder or the download URL prefix
    train_examples: int
    test_examples: int
    seconds: float


def find_mirror(mirror_dir: Path, spec: SourceSpec) -> dict[str, Path] | None:
    """The mirror's four files by name, None when it has none of them.

    A mirror holding only some of the files is an error rather than a reason to download:
    it means a broken install, and silently replacing it would hide that.
    """
    paths = {f.filename: mirror_dir / f.filename for f in spec.files()}
    present = [name for name, path in paths.items() if path.is_file()]
    if not present:
        return None
    missing = sorted(set(paths) - set(present))
    if missing:
        raise SourceError(
            f"{mirror_dir}: mirror is incomplete, missing {', '.join(missing)}; reinstall it "
            "(apt-get install --reinstall dataset-fashion-mnist) or point data.mirror_dir "
            "at a folder with all four files"
        )
    return paths


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _make_download_manager(**kwargs) -> tfds.download.DownloadManager:
    """tfds's download manager (one place to build it, so tests can stand in for it)."""
    return tfds.download.DownloadManager(**kwargs)


def download_with_tfds(spec: SourceSpec, download_dir: Path) -> tuple[dict[str, Path], str]:
    """Fetch the four files through tfds's download manager, checked against tfds's checksums.

    Returns the downloaded paths by file name and the URL prefix they came from.
    """
    builder_cls = tfds.builder_cls(TFDS_NAME)
    base_url = builder_cls.URL
    url = urlparse(base_url)
    host, port = url.hostname or "", url.port or 80
    try:  # fail in seconds when offline instead of waiting on retries
        socket.create_connection((host, port), timeout=NETWORK_TIMEOUT_S).close()
    except OSError as exc:
        raise SourceError(
            f"cannot reach {host} to download Fashion-MNIST ({exc}). Offline, install the "
            "local mirror: apt-get install dataset-fashion-mnist (it puts the four files in "
            "/usr/share/datasets/fashion-mnist), or set data.mirror_dir to a folder with them"
        ) from None

    manager = _make_download_manager(
        download_dir=download_dir,
        url_infos=builder_cls.url_infos,
        dataset_name=TFDS_NAME,
        force_checksums_validation=True,
    )
    urls = {f.filename: base_url + f.filename for f in spec.files()}
    try:
        with _socket_timeout(NETWORK_TIMEOUT_S):
            paths = manager.download(urls)
    except Exception as exc:  # tfds raises many kinds; all mean "no verified download"
        raise SourceError(f"tfds download of {TFDS_NAME} from {base_url} failed: {exc}") from exc
    return {name: Path(path) for name, path in paths.items()}, base_url


def read_verified(paths: dict[str, Path], spec: SourceSpec) -> FashionMnistArrays:
    """Parse and check all four files; nothing is written before every one passed."""
    return FashionMnistArrays(
        train_images=read_idx(paths[spec.train.images.filename], spec.train.images, spec),
        train_labels=read_idx(paths[spec.train.labels.filename], spec.train.labels, spec),
        test_images=read_idx(paths[spec.test.images.filename], spec.test.images, spec),
        test_labels=read_idx(paths[spec.test.labels.filename], spec.test.labels, spec),
    )


def _examples(images: np.ndarray, labels: np.ndarray) -> Iterator[tuple[int, dict]]:
    assert images.ndim == 3 and images.shape[1:] == IMAGE_SHAPE[:2], images.shape
    assert images.shape[0] == labels.shape[0], (images.shape, labels.shape)
    for index in range(images.shape[0]):
        yield index, {"image": png_bytes(images[index]), "label": int(labels[index])}


def _features():
    # The same features as tfds's own fashion_mnist builder.
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=IMAGE_SHAPE),
            "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
        }
    )


def write_tfds_dataset(arrays: FashionMnistArrays, scratch_dir: Path) -> Path:
    """Write both splits in tfds format under `scratch_dir`; return the dataset folder."""
    # tfds prints "Downloading and preparing dataset..." even though nothing is downloaded
    # here; our own log lines say what happens, so keep that misleading line out.
    with contextlib.redirect_stdout(io.StringIO()):
        builder = tfds.dataset_builders.store_as_tfds_dataset(
            name=TFDS_NAME,
            version=TFDS_VERSION,
            features=_features(),
            split_datasets={
                "train": _examples(arrays.train_images, arrays.train_labels),
                "test": _examples(arrays.test_images, arrays.test_labels),
            },
            data_dir=scratch_dir,
            description=(
                "Fashion-MNIST (Zalando): 28x28 grey images of 10 garment classes, "
                "written by the dcgan-pipeline ingest stage from the verified raw IDX files."
            ),
            homepage="https://github.com/zalandoresearch/fashion-mnist",
            # Keep source order, so that `data.limit` means "the first N" on disk too.
            disable_shuffling=True,
            download_config=tfds.download.DownloadConfig(try_download_gcs=False),
        )
    # What tfds says it wrote must be what we handed it, before it replaces anything.
    written = {name: split.num_examples for name, split in builder.info.splits.items()}
    expected = {"train": len(arrays.train_labels), "test": len(arrays.test_labels)}
    if written != expected:
        raise RuntimeError(f"tfds wrote {written} examples, expected {expected}")
    return scratch_dir / TFDS_NAME


def _default_download_dir() -> Path:
    return Path.home() / "tensorflow_datasets" / "downloads"


def fetch_verified(
    cfg: DataConfig, spec: SourceSpec = FASHION_MNIST, download_dir: Path | None = None
) -> tuple[FashionMnistArrays, str, str]:
    """All of Fashion-MNIST, checked against the pinned digests, from the mirror (or tfds's
    download when there is none); with the source's kind and location."""
    mirror_dir = Path(cfg.mirror_dir)
    paths = find_mirror(mirror_dir, spec)
    if paths is not None:
        source, location = "mirror", str(mirror_dir)
        log.info("source: local mirror %s", mirror_dir)
    else:
        log.info("no mirror at %s; downloading %s through tfds", mirror_dir, TFDS_NAME)
        paths, location = download_with_tfds(spec, download_dir or _default_download_dir())
        source = "tfds-download"
    return read_verified(paths, spec), source, location


def run_ingest(
    cfg: DataConfig,
    out_dir: Path = DEFAULT_OUT_DIR,
    spec: SourceSpec = FASHION_MNIST,
    download_dir: Path | None = None,
) -> IngestResult:
    """Verify the source, then write it to `out_dir` in tfds format (atomically)."""
    started = time.perf_counter()
    available = spec.train.images.count
    if cfg.limit is not None and cfg.limit > available:
        raise ConfigError(
            f"data.limit: {cfg.limit} exceeds the {available} training examples in the source"
        )
    out_dir = Path(out_dir)
    recover_interrupted(out_dir)
    arrays, source, location = fetch_verified(cfg, spec, download_dir)
    if cfg.limit is not None:
        arrays = replace(
            arrays,
            train_images=arrays.train_images[: cfg.limit],
            train_labels=arrays.train_labels[: cfg.limit],
        )
    n_train, n_test = len(arrays.train_labels), len(arrays.test_labels)
    log.info("verified %d train + %d test examples; writing tfds dataset", n_train, n_test)

    tfds.disable_progress_bar()
    with scratch_beside(out_dir) as scratch:
        dataset_dir = write_tfds_dataset(arrays, scratch)
        provenance = {
            "source": source,
            "location": location,
            "sha256": {f.filename: f.sha256 for f in spec.files()},
            "limit": cfg.limit,
            "train_examples": n_train,
            "test_examples": n_test,
        }
        (dataset_dir / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        replace_dir(dataset_dir, out_dir)

    return IngestResult(
        out_dir=out_dir,
        source=source,
        location=location,
        train_examples=n_train,
        test_examples=n_test,
        seconds=time.perf_counter() - started,
    )


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(
        "ingest", "Write Fashion-MNIST in tensorflow-datasets format (stage 'ingest')."
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR, help="dataset folder")
    args = parser.parse_args(argv)
    setup_logging()

    try:
        cfg = load_config(args.params)
        result = run_ingest(cfg.data, args.out)
    except (ConfigError, SourceError) as exc:
        print(f"ingest: error: {exc}", file=sys.stderr)
        return 1
    log.info(
        "wrote %s: %d train + %d test examples from %s (%s) in %.1f s",
        result.out_dir,
        result.train_examples,
        result.test_examples,
        result.source,
        result.location,
        result.seconds,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
