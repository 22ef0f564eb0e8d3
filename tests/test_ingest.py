"""The ingest stage on tiny mirrors written by the tests: output, limits, every bad source."""

from __future__ import annotations

import gzip
import json
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from components import ingest
from components.config import ConfigError, DataConfig
from components.idx import SourceError
from components.images import png_bytes
from tests.conftest import REPO_ROOT, TinyMirror, idx_bytes, snapshot, write_gz


def read_split(dataset_dir: Path, split: str) -> dict[str, np.ndarray]:
    builder = tfds.builder_from_directory(str(dataset_dir / ingest.TFDS_VERSION))
    return tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))


def test_writes_tfds_dataset_with_fashion_mnist_features(tiny_mirror: TinyMirror, tmp_path: Path):
    out = tmp_path / "data" / "fashion_mnist"
    result = ingest.run_ingest(DataConfig(mirror_dir=str(tiny_mirror.dir)), out, tiny_mirror.spec)

    assert (result.source, result.train_examples, result.test_examples) == ("mirror", 40, 20)
    builder = tfds.builder_from_directory(str(out / ingest.TFDS_VERSION))
    features = builder.info.features
    assert features["image"].shape == (28, 28, 1)
    assert features["image"].np_dtype == np.uint8
    assert features["label"].names == list(ingest.CLASS_NAMES)
    assert builder.info.splits["train"].num_examples == 40
    assert builder.info.splits["test"].num_examples == 20

    # Pixels and labels survive the round trip exactly, in source order.
    train = read_split(out, "train")
    np.testing.assert_array_equal(train["image"][..., 0], tiny_mirror.train_images)
    np.testing.assert_array_equal(train["label"], tiny_mirror.train_labels)
    test = read_split(out, "test")
    np.testing.assert_array_equal(test["image"][..., 0], tiny_mirror.test_images)

    # Also loadable by name, as users of tfds expect.
    by_name = tfds.load("fashion_mnist", data_dir=str(out.parent), split="test", batch_size=-1)
    np.testing.assert_array_equal(tfds.as_numpy(by_name)["label"], tiny_mirror.test_labels)

    provenance = json.loads((out / ingest.PROVENANCE_FILE).read_text())
    assert provenance["source"] == "mirror"
    assert provenance["location"] == str(tiny_mirror.dir)
    assert not list(out.parent.glob(".fashion_mnist.*")), "scratch folders left behind"


def test_output_is_byte_identical_across_runs(tiny_mirror: TinyMirror, tmp_path: Path):
    cfg = DataConfig(mirror_dir=str(tiny_mirror.dir))
    ingest.run_ingest(cfg, tmp_path / "a" / "fashion_mnist", tiny_mirror.spec)
    ingest.run_ingest(cfg, tmp_path / "b" / "fashion_mnist", tiny_mirror.spec)
    assert snapshot(tmp_path / "a" / "fashion_mnist") == snapshot(tmp_path / "b" / "fashion_mnist")


def test_limit_keeps_first_training_examples_and_whole_test_split(
    tiny_mirror: TinyMirror, tmp_path: Path
):
    out = tmp_path / "fashion_mnist"
    cfg = DataConfig(mirror_dir=str(tiny_mirror.dir), limit=15)
    result = ingest.run_ingest(cfg, out, tiny_mirror.spec)
    assert (result.train_examples, result.test_examples) == (15, 20)
    train = read_split(out, "train")
    np.testing.assert_array_equal(train["image"][..., 0], tiny_mirror.train_images[:15])
    assert read_split(out, "test")["label"].shape == (20,)


def test_limit_beyond_the_source_is_a_config_error(tiny_mirror: TinyMirror, tmp_path: Path):
    cfg = DataConfig(mirror_dir=str(tiny_mirror.dir), limit=41)
    with pytest.raises(ConfigError, match="data.limit: 41 exceeds the 40 training examples"):
        ingest.run_ingest(cfg, tmp_path / "fashion_mnist", tiny_mirror.spec)


# --- every malformed mirror fails with its own message and leaves the earlier output alone ---


def _regzip_with(mirror: TinyMirror, filename: str, payload: bytes) -> None:
    write_gz(mirror.path(filename), payload)


def remove_file(m: TinyMirror) -> None:
    m.path("t10k-labels-idx1-ubyte.gz").unlink()


def truncate_gzip(m: TinyMirror) -> None:
    path = m.path("train-images-idx3-ubyte.gz")
    path.write_bytes(path.read_bytes()[:500])


def not_gzip(m: TinyMirror) -> None:
    m.path("train-labels-idx1-ubyte.gz").write_bytes(b"<html>404 Not Found</html>")


def wrong_magic(m: TinyMirror) -> None:
    # A labels file where an images file belongs.
    _regzip_with(m, "t10k-images-idx3-ubyte.gz", idx_bytes(m.test_labels))


def wrong_count(m: TinyMirror) -> None:
    _regzip_with(m, "train-labels-idx1-ubyte.gz", idx_bytes(m.train_labels[:-1]))


def wrong_image_size(m: TinyMirror) -> None:
    _regzip_with(m, "train-images-idx3-ubyte.gz", idx_bytes(m.train_images[:, :27, :]))


def short_payload(m: TinyMirror) -> None:
    payload = idx_bytes(m.test_images)
    _regzip_with(m, "t10k-images-idx3-ubyte.gz", payload[:-28])


def label_out_of_range(m: TinyMirror) -> None:
    labels = m.train_labels.copy()
    labels[7] = 10
    _regzip_with(m, "train-labels-idx1-ubyte.gz", idx_bytes(labels))


def wrong_digest(m: TinyMirror) -> None:
    images = m.train_images.copy()
    images[0, 0, 0] ^= 1  # one pixel differs: structurally valid, not the pinned data
    _regzip_with(m, "train-images-idx3-ubyte.gz", idx_bytes(images))


@pytest.mark.parametrize(
    ("damage", "culprit", "message"),
    [
        (remove_file, "mirror", "mirror is incomplete, missing t10k-labels-idx1-ubyte.gz"),
        (truncate_gzip, "train-images-idx3-ubyte.gz", "truncated gzip stream"),
        (not_gzip, "train-labels-idx1-ubyte.gz", "not a valid gzip file"),
        (wrong_magic, "t10k-images-idx3-ubyte.gz", "wrong IDX magic number 0x00000801"),
        (wrong_count, "train-labels-idx1-ubyte.gz", "header says 39 labels, expected 40"),
        (wrong_image_size, "train-images-idx3-ubyte.gz", "images are 27x28, expected 28x28"),
        (short_payload, "t10k-images-idx3-ubyte.gz", "payload holds 15652 bytes"),
        (label_out_of_range, "train-labels-idx1-ubyte.gz", "1 label(s) out of range (max 10)"),
        (wrong_digest, "train-images-idx3-ubyte.gz", "content differs from the pinned dataset"),
    ],
    ids=lambda value: getattr(value, "__name__", None),
)
def test_malformed_mirror_fails_and_keeps_earlier_output(
    tiny_mirror: TinyMirror, tmp_path: Path, damage, culprit, message
):
    out = tmp_path / "data" / "fashion_mnist"
    cfg = DataConfig(mirror_dir=str(tiny_mirror.dir))
    ingest.run_ingest(cfg, out, tiny_mirror.spec)
    before = snapshot(out)

    damage(tiny_mirror)
    with pytest.raises(SourceError) as excinfo:
        ingest.run_ingest(cfg, out, tiny_mirror.spec)

    text = str(excinfo.value)
    assert message in text
    assert culprit in text
    assert snapshot(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["fashion_mnist"]


def test_crash_while_writing_keeps_earlier_output(
    tiny_mirror: TinyMirror, tmp_path: Path, monkeypatch
):
    out = tmp_path / "fashion_mnist"
    cfg = DataConfig(mirror_dir=str(tiny_mirror.dir))
    ingest.run_ingest(cfg, out, tiny_mirror.spec)
    before = snapshot(out)

    def half_written(arrays, scratch_dir):
        (scratch_dir / "fashion_mnist").mkdir()
        (scratch_dir / "fashion_mnist" / "partial.tfrecord").write_bytes(b"xx")
        raise OSError("disk full")

    monkeypatch.setattr(ingest, "write_tfds_dataset", half_written)
    with pytest.raises(OSError, match="disk full"):
        ingest.run_ingest(cfg, out, tiny_mirror.spec)
    assert snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_next_run_restores_output_when_killed_between_renames(
    tiny_mirror: TinyMirror, tmp_path: Path
):
    out = tmp_path / "fashion_mnist"
    cfg = DataConfig(mirror_dir=str(tiny_mirror.dir))
    ingest.run_ingest(cfg, out, tiny_mirror.spec)
    before = snapshot(out)
    # The state a SIGKILL leaves after `out -> backup` and before `new -> out`:
    out.rename(tmp_path / ".fashion_mnist.old-123")
    (tmp_path / ".fashion_mnist.tmp-abc" / "fashion_mnist").mkdir(parents=True)

    not_gzip(tiny_mirror)  # and this run fails: the earlier output must be back anyway
    with pytest.raises(SourceError):
        ingest.run_ingest(cfg, out, tiny_mirror.spec)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fashion_mnist", "mirror"]


# --- the tfds download path, used when there is no mirror ---


class FakeDownloadManager:
    """Stands in for tfds's DownloadManager: serves the tiny files, records how it was used."""

    instances: list[FakeDownloadManager] = []

    def __init__(self, mirror: TinyMirror, **kwargs):
        self.mirror, self.kwargs = mirror, kwargs
        FakeDownloadManager.instances.append(self)

    def download(self, urls: dict[str, str]) -> dict[str, Path]:
        self.urls = urls
        return {name: self.mirror.path(url.rsplit("/", 1)[-1]) for name, url in urls.items()}


def test_without_mirror_downloads_through_tfds_with_its_checksums(
    tiny_mirror: TinyMirror, tmp_path: Path, monkeypatch
):
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: socket.socket())
    FakeDownloadManager.instances.clear()
    monkeypatch.setattr(
        ingest,
        "_make_download_manager",
        lambda **kwargs: FakeDownloadManager(tiny_mirror, **kwargs),
    )
    cfg = DataConfig(mirror_dir=str(tmp_path / "no-mirror-here"))
    out = tmp_path / "fashion_mnist"
    result = ingest.run_ingest(cfg, out, tiny_mirror.spec, download_dir=tmp_path / "dl")

    assert result.source == "tfds-download"
    (manager,) = FakeDownloadManager.instances
    registered = tfds.builder_cls("fashion_mnist").url_infos
    assert set(manager.urls.values()) == set(registered)  # tfds's own URLs...
    assert manager.kwargs["url_infos"] == registered  # ...checked against its checksums
    assert manager.kwargs["force_checksums_validation"] is True
    np.testing.assert_array_equal(read_split(out, "test")["label"], tiny_mirror.test_labels)


def test_without_mirror_or_network_fails_fast_saying_what_to_install(
    tiny_mirror: TinyMirror, tmp_path: Path, monkeypatch
):
    def offline(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(socket, "create_connection", offline)
    cfg = DataConfig(mirror_dir=str(tmp_path / "no-mirror-here"))
    with pytest.raises(SourceError, match="apt-get install dataset-fashion-mnist"):
        ingest.run_ingest(cfg, tmp_path / "fashion_mnist", tiny_mirror.spec)
    assert not (tmp_path / "fashion_mnist").exists()


# --- the command line ---


def test_cli_rejects_bad_params_before_any_work(tmp_path: Path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  limit: 0\n")
    out = tmp_path / "fashion_mnist"
    assert ingest.main(["--params", str(params), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "ingest: error:" in err and "data.limit" in err
    assert not out.exists()


def test_cli_reports_a_bad_mirror_in_one_line(tiny_mirror: TinyMirror, tmp_path: Path, capsys):
    remove_file(tiny_mirror)
    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  mirror_dir: {tiny_mirror.dir}\n")
    assert ingest.main(["--params", str(params), "--out", str(tmp_path / "fm")]) == 1
    assert "mirror is incomplete" in capsys.readouterr().err


def test_module_entry_point_rejects_unknown_arguments():
    completed = subprocess.run(
        [sys.executable, "-m", "components.ingest", "--epochs", "3"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert completed.returncode == 2
    assert "unrecognized arguments: --epochs" in completed.stderr


def test_png_encoding_is_valid_for_any_pixels():
    import io

    from PIL import Image

    rng = np.random.default_rng(1)
    for image in [
        np.zeros((28, 28), np.uint8),
        np.full((28, 28), 255, np.uint8),
        rng.integers(0, 256, (28, 28), dtype=np.uint8),
    ]:
        decoded = np.asarray(Image.open(io.BytesIO(png_bytes(image))))
        np.testing.assert_array_equal(decoded, image)


def test_header_only_file_is_reported_as_too_short(tiny_mirror: TinyMirror, tmp_path: Path):
    tiny_mirror.path("t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(struct.pack(">I", 2049))
    )
    with pytest.raises(SourceError, match="too short for an IDX header"):
        ingest.run_ingest(
            DataConfig(mirror_dir=str(tiny_mirror.dir)), tmp_path / "fm", tiny_mirror.spec
        )
