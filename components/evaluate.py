"""Stage `evaluate`: how good are the samples, next to what real data scores.

Reads `samples/samples.npz` (generate), the feature network (by default the classifier
stage's `models/classifier.keras`, at its `features` layer) and the validated test split,
and writes:

- `reports/metrics.json` (DVC metrics): FID, KID (mean and std over subsets), the
  classifier-based Inception Score, precision, recall, density, coverage and the class
  histogram's entropy and smallest share, for the samples against the test split; under
  `floor`, the same for `evaluate.real_images` real training images against the test
  split: what a perfect generator would score; under `setup`, what was measured how.
- `reports/class_histogram.json` (a DVC plot): each class's share among the samples as
  the classifier sees them, beside its share among the real images.
- `reports/class_grid.png` (a DVC image plot): samples sorted into rows by predicted class.

Any Keras model file can serve as the feature network (`evaluate.feature_model`: a path,
or `classifier` for the classifier stage's; `evaluate.feature_layer`): images go in as
float pixels 0..255, resized to its input size and repeated to its channels (README: how
to plug in InceptionV3). The class-based figures always come from the classifier. All
metric math is in components/gan_metrics.py.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from components import gan_metrics
from components.atomic import write_file_atomic
from components.cli import prefer_onednn, setup_logging, stage_parser
from components.config import Config, ConfigError, EvaluateConfig, load_config
from components.example_stats import DatasetError, read_split
from components.images import image_grid, png_bytes, with_row_labels
from components.ingest import CLASS_NAMES
from components.validate import (
    DEFAULT_DATASET_DIR,
    DEFAULT_SUMMARY,
    UnvalidatedDataError,
    require_validated,
)

log = logging.getLogger("evaluate")

DEFAULT_SAMPLES = Path("samples/samples.npz")
DEFAULT_CLASSIFIER = Path("models/classifier.keras")
DEFAULT_METRICS = Path("reports/metrics.json")
DEFAULT_HISTOGRAM = Path("reports/class_histogram.json")
DEFAULT_CLASS_GRID = Path("reports/class_grid.png")
CLASSIFIER_LOGITS = "logits"
CLASSIFIER_KEYWORD = "classifier"  # evaluate.feature_model: the classifier stage's network
BATCH = 5000  # images per network call
GRID_PER_CLASS = 16  # samples shown in each row of class_grid.png


class EvaluateError(RuntimeError):
    """The samples or a network cannot be evaluated; says what is wrong and what to do."""


@dataclass(frozen=True)
class EvaluateResult:
    metrics: dict[str, Any]
    seconds: float


# ----------------------------------------------------------------------------- inputs


def load_samples(path: Path) -> np.ndarray:
    """generate's images, uint8 [N, 28, 28], checked (no pickles are ever loaded)."""
    if not path.is_file():
        raise EvaluateError(f"{path}: no samples; run `dvc repro generate` first")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "images" not in archive.files:
                raise EvaluateError(f"{path}: no `images` array (has: {', '.join(archive.files)})")
            images = archive["images"]
    except (OSError, ValueError) as exc:
        raise EvaluateError(f"{path}: not a readable .npz file ({exc})") from exc
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise EvaluateError(
            f"{path}: `images` must be uint8 [N, 28, 28], got {images.dtype} {images.shape}"
        )
    return images


class Probe:
    """A saved Keras model read at some of its layers, for uint8 [N, 28, 28] images."""

    def __init__(self, path: Path, layers: list[str]):
        if not path.is_file():
            stage = " (run `dvc repro classifier`)" if path == DEFAULT_CLASSIFIER else ""
            raise EvaluateError(f"{path}: no such model{stage}")
        prefer_onednn()  # ~2x faster inference here; TensorFlow loads with keras, below
        import keras
        import tensorflow as tf

        try:
            model = keras.models.load_model(path, compile=False, safe_mode=True)
        except Exception as exc:  # Keras raises several kinds for a damaged or foreign file
            raise EvaluateError(f"{path}: not a loadable Keras model ({exc})") from exc
        names = [layer.name for layer in model.layers]
        missing = [name for name in layers if name and name not in names]
        if missing:
            raise EvaluateError(
                f"{path}: no layer named {', '.join(map(repr, missing))} "
                f"(evaluate.feature_layer); its layers: {', '.join(names)}"
            )
        outputs = [model.get_layer(name).output if name else model.outputs[0] for name in layers]
        probe = keras.Model(model.inputs, outputs)
        # One compiled graph for every batch: ~1.4x faster than calling the model eagerly.
        self.model = tf.function(lambda x: probe(x, training=False))
        self.path = path
        self.input_shape = tuple(model.inputs[0].shape[1:])
        if len(self.input_shape) != 3 or self.input_shape[-1] not in (1, 3):
            raise EvaluateError(
                f"{path}: expected an image input [H, W, 1 or 3], got {self.input_shape}"
            )

    def __call__(self, images: np.ndarray) -> list[np.ndarray]:
        """One float64 array [N, ...] per layer, flattened to [N, D]."""
        import tensorflow as tf

        height, width, channels = self.input_shape
        parts: list[list[np.ndarray]] = []
        for start in range(0, len(images), BATCH):
            x = tf.convert_to_tensor(images[start : start + BATCH, :, :, None], tf.float32)
            if (height, width) != tuple(x.shape[1:3]):
                x = tf.image.resize(x, (height, width), method="bilinear")
            if channels == 3:
                x = tf.repeat(x, 3, axis=-1)
            outputs = self.model(x)
            outputs = outputs if isinstance(outputs, list | tuple) else [outputs]
            parts.append([np.asarray(o, np.float64).reshape(len(o), -1) for o in outputs])
        return [np.concatenate(column) for column in zip(*parts, strict=True)]


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class Embedded:
    """What the networks make of one image set."""

    features: np.ndarray  # [N, D] from the feature network
    probabilities: np.ndarray  # [N, classes] from the classifier


def feature_model_path(cfg: EvaluateConfig, classifier_path: Path) -> Path:
    return classifier_path if cfg.feature_model == CLASSIFIER_KEYWORD else Path(cfg.feature_model)


def embed_with(cfg: EvaluateConfig, classifier_path: Path):
    """A function images -> Embedded; one pass when the classifier is the feature network."""
    if cfg.feature_model == CLASSIFIER_KEYWORD:
        probe = Probe(classifier_path, [cfg.feature_layer, CLASSIFIER_LOGITS])

        def embed(images: np.ndarray) -> Embedded:
            features, logits = probe(images)
            return Embedded(features, _softmax(logits))

        return embed
    features_probe = Probe(Path(cfg.feature_model), [cfg.feature_layer])
    classifier_probe = Probe(classifier_path, [CLASSIFIER_LOGITS])

    def embed(images: np.ndarray) -> Embedded:
        return Embedded(features_probe(images)[0], _softmax(classifier_probe(images)[0]))

    return embed


# ----------------------------------------------------------------------------- metrics


def score(
    candidate: Embedded,
    reference: Embedded,
    cfg: EvaluateConfig,
    seed: int,
    reference_radii: np.ndarray | None = None,
) -> dict:
    """Every metric of `candidate` images against `reference` (the test split);
    `reference_radii` (gan_metrics.knn_squared_radii of the reference) may be reused."""
    kid = gan_metrics.kid(
        candidate.features, reference.features, cfg.kid_subsets, cfg.kid_subset_size, seed
    )
    inception = gan_metrics.inception_score(candidate.probabilities, cfg.score_splits)
    manifolds = gan_metrics.prdc(
        reference.features, candidate.features, cfg.nearest_k, reference_radii
    )
    classes = gan_metrics.class_histogram(candidate.probabilities)
    return {
        "fid": gan_metrics.fid(candidate.features, reference.features),
        "kid": {"mean": kid.mean, "std": kid.std},
        "inception_score": {"mean": inception.mean, "std": inception.std},
        "precision": manifolds.precision,
        "recall": manifolds.recall,
        "density": manifolds.density,
        "coverage": manifolds.coverage,
        "class_entropy_bits": classes.entropy,
        "class_entropy_normalized": classes.normalized_entropy,
        "smallest_class_share": classes.smallest_share,
        "classes_present": classes.classes_present,
        "class_shares": dict(zip(CLASS_NAMES, classes.shares, strict=True)),
    }


def class_grid(images: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """One labelled row per class: the first GRID_PER_CLASS samples predicted as it (an empty
    row is a class the generator never makes)."""
    predicted = probabilities.argmax(axis=1)
    shares = np.bincount(predicted, minlength=len(CLASS_NAMES)) / len(predicted)
    cells = np.full((len(CLASS_NAMES), GRID_PER_CLASS, 28, 28), 128, dtype=np.uint8)
    for index in range(len(CLASS_NAMES)):
        chosen = images[predicted == index][:GRID_PER_CLASS]
        cells[index, : len(chosen)] = chosen
    scale, gap = 2, 2
    grid = image_grid(cells.reshape(-1, 28, 28), scale=scale, gap=gap, cols=GRID_PER_CLASS)
    labels = [f"{name} {share:.1%}" for name, share in zip(CLASS_NAMES, shares, strict=True)]
    return with_row_labels(grid, labels, cell=28 * scale, gap=gap)


# ----------------------------------------------------------------------------- the stage


def run_evaluate(
    cfg: Config,
    samples_path: Path = DEFAULT_SAMPLES,
    classifier_path: Path = DEFAULT_CLASSIFIER,
    dataset_dir: Path = DEFAULT_DATASET_DIR,
    summary_path: Path = DEFAULT_SUMMARY,
    metrics_path: Path = DEFAULT_METRICS,
    histogram_path: Path = DEFAULT_HISTOGRAM,
    class_grid_path: Path = DEFAULT_CLASS_GRID,
) -> EvaluateResult:
    started = time.perf_counter()
    ev = cfg.evaluate
    require_validated(summary_path, dataset_dir)
    samples = load_samples(samples_path)
    needed = max(ev.nearest_k + 1, 2)
    if len(samples) < needed:
        raise EvaluateError(
            f"{samples_path}: {len(samples)} samples; evaluate.nearest_k = {ev.nearest_k} "
            f"needs at least {needed} (raise generate.num_samples)"
        )
    embed = embed_with(ev, classifier_path)

    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(cfg.seed)
    tf.config.experimental.enable_op_determinism()
    test_images, _ = read_split(dataset_dir, "test")
    real_images, _ = read_split(dataset_dir, "train", ev.real_images)
    log.info(
        "%d samples and %d real training images against the %d test images",
        len(samples), len(real_images), len(test_images),
    )  # fmt: skip
    # NumPy's scoring overlaps TensorFlow's embedding: the network runs in this thread,
    # each set is scored in a worker as soon as its features exist (NumPy releases the GIL,
    # and much of its work is single-threaded). Nothing depends on the order of finishing.
    with ThreadPoolExecutor(max_workers=2) as pool:
        reference = embed(test_images)
        radii = pool.submit(gan_metrics.knn_squared_radii, reference.features, ev.nearest_k)
        real = embed(real_images)
        floor = pool.submit(lambda: score(real, reference, ev, cfg.seed, radii.result()))
        generated = embed(samples)
        embedded = time.perf_counter()
        metrics = score(generated, reference, ev, cfg.seed, radii.result())
        metrics["floor"] = floor.result()
    feature_path = feature_model_path(ev, classifier_path)
    metrics["setup"] = {
        "samples": len(samples),
        "reference": f"test split, {len(test_images)} images",
        "floor_images": len(real_images),
        "feature_network": f"{feature_path}:{ev.feature_layer or 'output'}",
        "feature_dim": int(generated.features.shape[1]),
        "classifier": str(classifier_path),
        "nearest_k": ev.nearest_k,
        "kid_subsets": ev.kid_subsets,
        "kid_subset_size": min(ev.kid_subset_size, len(samples), len(test_images)),
        "score_splits": ev.score_splits,
    }
    log.info(
        "features in %.1f s (the floor's metrics alongside), then metrics in %.1f s",
        embedded - started, time.perf_counter() - embedded,
    )  # fmt: skip

    histogram = [
        {"class": name, "generated": metrics["class_shares"][name],
         "real": metrics["floor"]["class_shares"][name]}
        for name in CLASS_NAMES
    ]  # fmt: skip
    grid = png_bytes(class_grid(samples, generated.probabilities))
    write_file_atomic(class_grid_path, grid)
    write_file_atomic(histogram_path, (json.dumps(histogram, indent=2) + "\n").encode())
    write_file_atomic(metrics_path, (json.dumps(metrics, indent=2) + "\n").encode())
    return EvaluateResult(metrics, time.perf_counter() - started)


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """The headline figures beside their real-data floors, for the log."""
    floor = metrics["floor"]
    rows = [
        ("FID", metrics["fid"], floor["fid"], "lower is better"),
        ("KID", metrics["kid"]["mean"], floor["kid"]["mean"], "lower is better"),
        ("Inception Score", metrics["inception_score"]["mean"],
         floor["inception_score"]["mean"], "higher is better, at most 10"),
        ("precision", metrics["precision"], floor["precision"], "fidelity"),
        ("recall", metrics["recall"], floor["recall"], "diversity"),
        ("density", metrics["density"], floor["density"], "fidelity, ~1 for real data"),
        ("coverage", metrics["coverage"], floor["coverage"], "diversity"),
        ("smallest class share", metrics["smallest_class_share"],
         floor["smallest_class_share"], "0: a class is never made"),
    ]  # fmt: skip
    return [f"{name:<21} {value:10.4f}   real data {real:10.4f}   ({note})"
            for name, value, real, note in rows]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("evaluate", __doc__.splitlines()[0])
    parser.add_argument("--samples", type=Path, default=DEFAULT_SAMPLES)
    parser.add_argument("--classifier", type=Path, default=DEFAULT_CLASSIFIER)
    parser.add_argument("--dataset-dir", type=Path, default=DEFAULT_DATASET_DIR)
    parser.add_argument("--summary", type=Path, default=DEFAULT_SUMMARY)
    parser.add_argument("--metrics", type=Path, default=DEFAULT_METRICS)
    parser.add_argument("--histogram", type=Path, default=DEFAULT_HISTOGRAM)
    parser.add_argument("--class-grid", type=Path, default=DEFAULT_CLASS_GRID)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(args.params)
        result = run_evaluate(
            cfg, args.samples, args.classifier, args.dataset_dir, args.summary, args.metrics,
            args.histogram, args.class_grid,
        )  # fmt: skip
    except (ConfigError, EvaluateError, UnvalidatedDataError, DatasetError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 1
    for line in summary_lines(result.metrics):
        log.info(line)
    log.info("done in %.1f s: %s", result.seconds, args.metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
