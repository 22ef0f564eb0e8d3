"""Stage `train`: the DCGAN of components/models.py on the validated Fashion-MNIST.

Reads the dataset only after checking validate's `summary.json` (passed, and for this very
dataset), trains with one compiled step under a tf.distribute strategy, and writes:

- `models/checkpoints/`: `tf.train.Checkpoint`s holding both models, both optimisers, the
  epoch counter and every random-generator state, plus `fingerprint.json` (what shaped the
  training), `history.json` and `frames/` (per-epoch metrics and sample grids). A killed run
  resumes from the last checkpoint; a fingerprint that does not match starts fresh.
- `models/generator.keras`: the trained generator (Keras format, loads in safe mode).
- `reports/train/`: DVCLive's per-epoch metrics (losses, D(x), D(G(z)), images/s, epoch
  time) and the per-epoch sample grids from one fixed latent batch.

A non-finite loss stops training at once, before any further checkpoint is written.
"""

from __future__ import annotations

from components.cli import prefer_onednn

prefer_onednn()  # before TensorFlow is imported, below

import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Mapping  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from components import models  # noqa: E402
from components.atomic import (  # noqa: E402
    recover_interrupted,
    replace_dir,
    save_model_atomic,
    scratch_beside,
    write_file_atomic,
)
from components.cli import setup_logging, stage_parser  # noqa: E402
from components.config import Config, ConfigError, TrainConfig, load_config  # noqa: E402
from components.images import image_grid, png_bytes, to_uint8  # noqa: E402
from components.latents import fixed_latents  # noqa: E402
from components.validate import (  # noqa: E402
    DEFAULT_DATASET_DIR,
    DEFAULT_SUMMARY,
    UnvalidatedDataError,
    require_validated,
)

log = logging.getLogger("train")

DEFAULT_CHECKPOINT_DIR = Path("models/checkpoints")
DEFAULT_GENERATOR = Path("models/generator.keras")
DEFAULT_REPORT_DIR = Path("reports/train")
FINGERPRINT_FILE = "fingerprint.json"
HISTORY_FILE = "history.json"
FRAMES_DIR = "frames"
# Train keys that do not change what is learned, so changing them keeps the checkpoints:
# more `epochs` continues a finished run.
_BOOKKEEPING_KEYS = frozenset({"epochs", "checkpoint_every", "keep_checkpoints", "grid_size"})
# A progress line within an epoch at most this often (an epoch of 60k takes minutes on a CPU).
PROGRESS_SECONDS = 30.0
METRICS = ("g_loss", "d_loss", "d_real", "d_fake")


class TrainingError(RuntimeError):
    """Training cannot start or cannot go on; the message says why and what to do."""


class NonFiniteLossError(TrainingError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    start_epoch: int  # epochs already done when this run started (0: fresh)
    final_epoch: int
    resumed: bool
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


# ----------------------------------------------------------------------------- inputs


def load_images(dataset_dir: Path) -> tuple[tf.data.Dataset, int]:
    """The train split as float32 [28, 28, 1] in [-1, 1] (tanh's range), cached in memory,
    and its size, from the dataset's metadata (validate has checked it against the rows)."""
    builder = tfds.builder_from_directory(str(dataset_dir))
    examples = builder.as_dataset(split="train", shuffle_files=False)
    size = builder.info.splits["train"].num_examples

    def scale(example):
        image = tf.cast(example["image"], tf.float32) / 127.5 - 1.0
        image.shape.assert_is_compatible_with(models.IMAGE_SHAPE)
        return tf.ensure_shape(image, models.IMAGE_SHAPE)

    return examples.map(scale, num_parallel_calls=tf.data.AUTOTUNE).cache(), size


def epoch_batches(images: tf.data.Dataset, size: int, batch: int, seed: int, epoch: int):
    """One epoch of full batches in an order fixed by (seed, epoch).

    Each epoch has its own shuffle seed, so the order of epoch k does not depend on how
    many epochs this process has run: a resumed run sees exactly the batches that an
    uninterrupted one would.
    """
    order_seed = int(np.random.default_rng([seed, epoch]).integers(2**31))
    return (
        images.shuffle(size, seed=order_seed, reshuffle_each_iteration=False)
        .batch(batch, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
    )


# ----------------------------------------------------------------------------- set-up


def make_strategy(name: str) -> tf.distribute.Strategy:
    """`auto`: MirroredStrategy over the GPUs when there are several, else the default.
    `mirrored`: all GPUs, or all logical CPUs when there is no GPU. `multi_worker`: the
    cluster described by TF_CONFIG."""
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        return tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    if name == "mirrored":
        devices = gpus or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    if name == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            raise TrainingError(
                "train.strategy: multi_worker needs TF_CONFIG describing the cluster "
                "(see README, 'Several machines')"
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise TrainingError(f"train.strategy: unknown strategy {name!r}")


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(setting: str) -> str:
    """The Keras dtype policy for `train.mixed_precision`.

    `auto`: mixed_float16 on a GPU; mixed_bfloat16 on a CPU with bfloat16 instructions
    (AVX512-BF16 or AMX), where it is faster; float32 elsewhere, where bfloat16 would be
    emulated and slow.
    """
    if setting == "auto":
        if tf.config.list_logical_devices("GPU"):
            return "mixed_float16"
        return "mixed_bfloat16" if _cpu_has_bf16() else "float32"
    return {"off": "float32", "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}[setting]


def training_fingerprint(cfg: Config, dataset_fp: str) -> dict[str, Any]:
    """Everything that shapes training: checkpoints made under another one are not reused."""
    train = {k: v for k, v in cfg.train.model_dump().items() if k not in _BOOKKEEPING_KEYS}
    model_code = hashlib.sha256(Path(models.__file__).read_bytes()).hexdigest()
    return {"seed": cfg.seed, "train": train, "dataset": dataset_fp, "model_code": model_code}


def _fingerprint_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        if isinstance(new.get(key), dict) and isinstance(old.get(key), dict):
            keys += [f"{key}.{k}" for k in _fingerprint_differences(old[key], new[key])]
        elif old.get(key) != new.get(key):
            keys.append(key)
    return keys


@dataclass
class _Gan:
    """The trainable state; `checkpoint` holds all of it."""

    generator: keras.Model
    discriminator: keras.Model
    sampler: keras.Model  # what samples come from: the generator's moving average, or itself
    g_opt: keras.optimizers.Optimizer
    d_opt: keras.optimizers.Optimizer
    rng: tf.random.Generator
    epoch: tf.Variable
    checkpoint: tf.train.Checkpoint


def _optimizer(train: TrainConfig, policy: str) -> keras.optimizers.Optimizer:
    adam = keras.optimizers.Adam(learning_rate=train.learning_rate, beta_1=train.beta_1)
    # float16 gradients underflow without loss scaling; bfloat16 has float32's range.
    return keras.optimizers.LossScaleOptimizer(adam) if policy == "mixed_float16" else adam


def build_gan(cfg: Config, policy: str) -> _Gan:
    """Models, optimisers (built, so that a restore can be checked), RNG and checkpoint."""
    train = cfg.train
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        generator = models.build_generator(train.latent_dim, train.generator_width)
        average = models.build_generator(train.latent_dim, train.generator_width)
        discriminator = models.build_discriminator(train.discriminator_width, train.dropout)
        g_opt, d_opt = _optimizer(train, policy), _optimizer(train, policy)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    g_opt.build(generator.trainable_variables)
    d_opt.build(discriminator.trainable_variables)
    average.set_weights(generator.get_weights())
    sampler = average if train.ema_decay > 0 else generator
    rng = tf.random.Generator.from_seed(cfg.seed)
    epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
    # Dropout draws from Keras seed generators whose state the models' own checkpoint
    # entries leave out; without it a resumed run would drop different units.
    dropout_seeds = [v for v in discriminator.variables if "seed_generator" in v.path]
    checkpoint = tf.train.Checkpoint(
        generator=generator,
        generator_average=average,
        discriminator=discriminator,
        generator_optimizer=g_opt,
        discriminator_optimizer=d_opt,
        rng=rng,
        dropout_seeds=dropout_seeds,
        epoch=epoch,
    )
    return _Gan(generator, discriminator, sampler, g_opt, d_opt, rng, epoch, checkpoint)


def make_train_step(
    gan: _Gan, strategy: tf.distribute.Strategy, train: TrainConfig, jit: bool | None = None
) -> Callable:
    """One compiled step over a distributed batch -> (g_loss, d_loss, D(x), D(G(z))) means."""
    global_batch, latent_dim = train.batch_size, train.latent_dim
    scaled = isinstance(gan.g_opt, keras.optimizers.LossScaleOptimizer)

    def replica_step(images):
        # images: [b, 28, 28, 1] in [-1, 1], b = global_batch / replicas.
        noise = gan.rng.normal([tf.shape(images)[0], latent_dim])
        with tf.GradientTape() as g_tape, tf.GradientTape() as d_tape:
            fake = gan.generator(noise, training=True)  # [b, 28, 28, 1]
            real_logits = gan.discriminator(images, training=True)  # [b, 1]
            fake_logits = gan.discriminator(fake, training=True)  # [b, 1]
            # Averaged over the global batch: the replicas' gradients are summed.
            g_loss = tf.nn.compute_average_loss(
                models.generator_loss(fake_logits), global_batch_size=global_batch
            )
            d_loss = tf.nn.compute_average_loss(
                models.discriminator_loss(real_logits, fake_logits), global_batch_size=global_batch
            )
            g_target = gan.g_opt.scale_loss(g_loss) if scaled else g_loss
            d_target = gan.d_opt.scale_loss(d_loss) if scaled else d_loss
        g_vars, d_vars = gan.generator.trainable_variables, gan.discriminator.trainable_variables
        gan.g_opt.apply_gradients(zip(g_tape.gradient(g_target, g_vars), g_vars, strict=True))
        gan.d_opt.apply_gradients(zip(d_tape.gradient(d_target, d_vars), d_vars, strict=True))
        d_real = tf.reduce_sum(tf.sigmoid(real_logits)) / global_batch
        d_fake = tf.reduce_sum(tf.sigmoid(fake_logits)) / global_batch
        return g_loss, d_loss, d_real, d_fake

    def update_average():
        # Polyak averaging of every generator weight (BatchNorm's statistics included);
        # the decay ramps up over the first steps so that early samples are not the
        # random initial weights: min(decay, (1 + n) / (10 + n)) after n steps.
        steps = tf.cast(gan.g_opt.iterations, tf.float32)
        decay = tf.minimum(train.ema_decay, (1.0 + steps) / (10.0 + steps))
        for average, weight in zip(gan.sampler.weights, gan.generator.weights, strict=True):
            average.assign(decay * average + (1.0 - decay) * tf.cast(weight, average.dtype))

    @tf.function(jit_compile=train.jit_compile if jit is None else jit)
    def step(batch):
        per_replica = strategy.run(replica_step, args=(batch,))
        if train.ema_decay > 0:
            update_average()
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for v in per_replica]

    return step


# ----------------------------------------------------------------------------- state on disk


class _CheckpointDir:
    """models/checkpoints/: checkpoints, their fingerprint, history and frames, kept in step."""

    def __init__(self, path: Path, gan: _Gan, keep: int):
        self.path = path
        self.gan = gan
        self.keep = keep
        path.mkdir(parents=True, exist_ok=True)
        self.manager = tf.train.CheckpointManager(gan.checkpoint, str(path), max_to_keep=keep)
        # Frames of a run that starts fresh over another fingerprint's checkpoints wait
        # here until its first save, so that a run failing before then changes nothing.
        self.pending_frames: dict[int, bytes] = {}
        self.stale = False

    def stored_fingerprint(self) -> dict[str, Any] | None:
        file = self.path / FINGERPRINT_FILE
        return json.loads(file.read_text()) if file.is_file() else None

    def restore_latest(self) -> tuple[int, list[dict[str, float]]]:
        """Restore the newest checkpoint; every object must match. -> (epoch, its history)."""
        latest = self.manager.latest_checkpoint
        try:
            status = self.gan.checkpoint.restore(latest)
            status.assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as exc:
            raise TrainingError(
                f"{latest} does not fit the model although its fingerprint matches "
                f"({type(exc).__name__}: {str(exc).splitlines()[0]}); the folder was changed "
                f"by hand or damaged. Move {self.path} away to start fresh"
            ) from None
        epoch = int(self.gan.epoch.numpy())
        history = json.loads((self.path / HISTORY_FILE).read_text())
        return epoch, [record for record in history if record["epoch"] <= epoch]

    def frame_path(self, epoch: int) -> Path:
        return self.path / FRAMES_DIR / f"epoch_{epoch:04d}.png"

    def add_frame(self, epoch: int, png: bytes) -> None:
        if self.stale:
            self.pending_frames[epoch] = png
        else:
            write_file_atomic(self.frame_path(epoch), png)

    def _clear(self) -> None:
        """Drop another fingerprint's checkpoints, once this run has one of its own to save."""
        for child in self.path.iterdir():
            child.unlink() if child.is_file() else shutil.rmtree(child)
        self.manager = tf.train.CheckpointManager(
            self.gan.checkpoint, str(self.path), max_to_keep=self.keep
        )
        for epoch, png in self.pending_frames.items():
            write_file_atomic(self.frame_path(epoch), png)
        self.pending_frames, self.stale = {}, False

    def save(self, epoch: int, history: list[dict[str, float]], fingerprint: dict) -> str:
        if self.stale:
            self._clear()
        # History and fingerprint first; the checkpoint's pointer file, written last by
        # CheckpointManager, is what makes this epoch the one a resume starts from.
        write_file_atomic(self.path / HISTORY_FILE, json.dumps(history, indent=1).encode())
        write_file_atomic(self.path / FINGERPRINT_FILE, json.dumps(fingerprint, indent=1).encode())
        self.gan.epoch.assign(epoch)
        return self.manager.save(checkpoint_number=epoch)


# ----------------------------------------------------------------------------- logging


class _Report:
    """DVCLive in a scratch folder (replayed history first), swapped into place at the end."""

    def __init__(self, scratch: Path):
        from dvclive import Live  # DVCLive pulls in DVC; only the stage needs it

        self.live = Live(dir=str(scratch), save_dvc_exp=False, dvcyaml=None)

    def log_epoch(self, record: Mapping[str, float], frame: Path | np.ndarray) -> None:
        """One epoch's metrics and its sample grid (a uint8 image, or a PNG file's path)."""
        self.live.step = int(record["epoch"])
        for name, value in record.items():
            if name != "epoch":
                self.live.log_metric(f"train/{name}", float(value))
        image = str(frame) if isinstance(frame, Path) else frame
        self.live.log_image(f"progress/epoch_{int(record['epoch']):04d}.png", image)
        self.live.next_step()

    def close(self) -> None:
        self.live.end()


def _epoch_line(record: Mapping[str, float], epochs: int) -> str:
    return (
        f"epoch {int(record['epoch'])}/{epochs}  g_loss {record['g_loss']:.3f}  "
        f"d_loss {record['d_loss']:.3f}  D(x) {record['d_real']:.3f}  "
        f"D(G(z)) {record['d_fake']:.3f}  {record['images_per_sec']:.0f} img/s  "
        f"{record['epoch_seconds']:.1f} s"
    )


# ----------------------------------------------------------------------------- the stage


def _sample_grid(generator: keras.Model, latents: np.ndarray) -> np.ndarray:
    images = generator(latents, training=False)  # [n, 28, 28, 1] in [-1, 1]
    return image_grid(to_uint8(images))


def run_train(
    cfg: Config,
    dataset_dir: Path = DEFAULT_DATASET_DIR,
    summary_path: Path = DEFAULT_SUMMARY,
    checkpoint_dir: Path = DEFAULT_CHECKPOINT_DIR,
    generator_path: Path = DEFAULT_GENERATOR,
    report_dir: Path = DEFAULT_REPORT_DIR,
) -> TrainResult:
    """Train (or resume) the DCGAN; write checkpoints, the generator and the report."""
    started = time.perf_counter()
    train = cfg.train
    dataset_fp = require_validated(summary_path, dataset_dir)
    fingerprint = training_fingerprint(cfg, dataset_fp)

    keras.utils.set_random_seed(cfg.seed)
    if train.deterministic:
        tf.config.experimental.enable_op_determinism()
    strategy = make_strategy(train.strategy)
    replicas = strategy.num_replicas_in_sync
    if train.batch_size % replicas:
        raise TrainingError(
            f"train.batch_size: {train.batch_size} does not split over {replicas} replicas; "
            f"use a multiple of {replicas}"
        )
    images, size = load_images(dataset_dir)
    steps = size // train.batch_size
    if steps == 0:
        raise TrainingError(
            f"train.batch_size: {train.batch_size} is more than the {size} training examples; "
            "lower it or raise data.limit"
        )
    policy = resolve_precision(train.mixed_precision)
    with strategy.scope():
        gan = build_gan(cfg, policy)
    ckpts = _CheckpointDir(checkpoint_dir, gan, train.keep_checkpoints)

    start_epoch, history = 0, []
    if ckpts.manager.latest_checkpoint:
        stored = ckpts.stored_fingerprint()
        if stored == fingerprint:
            start_epoch, history = ckpts.restore_latest()
            log.info("resuming from epoch %d (%s)", start_epoch, ckpts.manager.latest_checkpoint)
        else:
            changed = _fingerprint_differences(stored or {}, fingerprint) or ["fingerprint missing"]
            log.warning(
                "starting fresh: the checkpoints in %s were made with different %s",
                checkpoint_dir,
                ", ".join(changed),
            )
            ckpts.stale = True
    if start_epoch >= train.epochs:
        log.info(
            "nothing to train: the checkpoint holds %d epochs (train.epochs: %d)",
            start_epoch, train.epochs,
        )  # fmt: skip

    log.info(
        "%d examples, %d steps of %d per epoch, epochs %d..%d, %s, %d replica(s), policy %s",
        size, steps, train.batch_size, start_epoch + 1, train.epochs,
        type(strategy).__name__, replicas, policy,
    )  # fmt: skip
    step_fn = make_train_step(gan, strategy, train)
    latents = fixed_latents(cfg.seed, train.grid_size, train.latent_dim)
    recover_interrupted(report_dir)
    with scratch_beside(report_dir) as scratch:
        report = _Report(scratch)
        for record in history:
            report.log_epoch(record, ckpts.frame_path(int(record["epoch"])))
        for epoch in range(start_epoch + 1, train.epochs + 1):
            record = _run_epoch(step_fn, strategy, images, size, cfg, epoch, steps)
            grid = _sample_grid(gan.sampler, latents)
            ckpts.add_frame(epoch, png_bytes(grid))
            history.append(record)
            report.log_epoch(record, grid)
            log.info(_epoch_line(record, train.epochs))
            if epoch % train.checkpoint_every == 0 or epoch == train.epochs:
                saved = ckpts.save(epoch, history, fingerprint)
                log.info("checkpoint %s", saved)
        save_model_atomic(gan.sampler, generator_path)
        report.close()
        replace_dir(scratch, report_dir)
    seconds = time.perf_counter() - started
    return TrainResult(
        start_epoch, max(start_epoch, train.epochs), start_epoch > 0, history, seconds
    )


def _run_epoch(step_fn, strategy, images, size, cfg: Config, epoch: int, steps: int) -> dict:
    train = cfg.train
    batches = epoch_batches(images, size, train.batch_size, cfg.seed, epoch)
    sums = np.zeros(len(METRICS))
    began = last_report = time.perf_counter()
    for step, batch in enumerate(strategy.experimental_distribute_dataset(batches), start=1):
        values = np.array([float(v) for v in step_fn(batch)])
        if not np.all(np.isfinite(values[:2])):
            raise NonFiniteLossError(
                f"epoch {epoch}, step {step}: non-finite loss (generator {values[0]}, "
                f"discriminator {values[1]}); training stopped and no checkpoint was written "
                "after it. Lower train.learning_rate, or check the data"
            )
        sums += values
        now = time.perf_counter()
        if now - last_report >= PROGRESS_SECONDS and step < steps:
            last_report, rate = now, step * train.batch_size / (now - began)
            log.info(
                "epoch %d step %d/%d  g_loss %.3f  d_loss %.3f  %.0f img/s",
                epoch, step, steps, values[0], values[1], rate,
            )  # fmt: skip
    seconds = time.perf_counter() - began
    record = {"epoch": epoch, **dict(zip(METRICS, (sums / steps).tolist(), strict=True))}
    record["images_per_sec"] = steps * train.batch_size / seconds
    record["epoch_seconds"] = seconds
    return record


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("train", __doc__.splitlines()[0])
    parser.add_argument("--dataset-dir", type=Path, default=DEFAULT_DATASET_DIR)
    parser.add_argument("--summary", type=Path, default=DEFAULT_SUMMARY)
    parser.add_argument("--checkpoint-dir", type=Path, default=DEFAULT_CHECKPOINT_DIR)
    parser.add_argument("--generator", type=Path, default=DEFAULT_GENERATOR)
    parser.add_argument("--report-dir", type=Path, default=DEFAULT_REPORT_DIR)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(args.params)
        result = run_train(
            cfg, args.dataset_dir, args.summary, args.checkpoint_dir, args.generator,
            args.report_dir,
        )  # fmt: skip
    except (ConfigError, TrainingError, UnvalidatedDataError) as exc:
        print(f"train: {exc}", file=sys.stderr)
        return 1
    if result.start_epoch >= result.final_epoch:
        trained = f"nothing to train, the checkpoint is at epoch {result.final_epoch} already"
    else:
        trained = f"epochs {result.start_epoch + 1}..{result.final_epoch}" + (
            " (resumed)" if result.resumed else ""
        )
    log.info(
        "done in %.1f s: %s; generator %s, report %s",
        result.seconds, trained, args.generator, args.report_dir,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
