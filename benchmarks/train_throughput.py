"""Training throughput: our train step against TensorFlow's DCGAN tutorial, same model.

Usage: python benchmarks/train_throughput.py [--rounds 3] [--steps 8] [--profile]

Two worker processes, started once and then driven in turns (interleaved, after warm-up):

- `tutorial`: a faithful re-implementation of tensorflow.org/tutorials/generative/dcgan
  as a user runs it: its generator and discriminator, BinaryCrossentropy(from_logits),
  Adam(1e-4) for both, batch 256, noise 100, a `tf.function` step, and the input pipeline
  `from_tensor_slices(images).shuffle(60000).batch(256)`, with TensorFlow's default
  settings (the environment variable TF_ENABLE_ONEDNN_OPTS removed).
- `ours`: the train stage's own code (components/train.py: its tf.data pipeline, its
  compiled distributed step, its process settings) on the same architecture and batch.

Each round times `--steps` steps of one worker, then of the other; the figure is the
median over rounds. Both train on the real data in data/fashion_mnist (`make bench` runs
ingest first). Also printed: each worker's peak resident memory (the training process as
a whole: TensorFlow, the cached dataset, models and optimiser state) and, with
`--profile`, where the time of our step goes. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BATCH = 256
NOISE_DIM = 100


# ----------------------------------------------------------------------------- the tutorial


def tutorial_worker(train_images):
    """The tutorial's code, kept as written there (names included); returns step() and the
    generator (which benchmarks/quality_vs_tutorial.py samples from)."""
    import tensorflow as tf
    from tensorflow.keras import layers

    def make_generator_model():
        model = tf.keras.Sequential()
        model.add(layers.Dense(7 * 7 * 256, use_bias=False, input_shape=(100,)))
        model.add(layers.BatchNormalization())
        model.add(layers.LeakyReLU())
        model.add(layers.Reshape((7, 7, 256)))
        model.add(
            layers.Conv2DTranspose(128, (5, 5), strides=(1, 1), padding="same", use_bias=False)
        )
        model.add(layers.BatchNormalization())
        model.add(layers.LeakyReLU())
        model.add(
            layers.Conv2DTranspose(64, (5, 5), strides=(2, 2), padding="same", use_bias=False)
        )
        model.add(layers.BatchNormalization())
        model.add(layers.LeakyReLU())
        model.add(
            layers.Conv2DTranspose(
                1, (5, 5), strides=(2, 2), padding="same", use_bias=False, activation="tanh"
            )
        )
        return model

    def make_discriminator_model():
        model = tf.keras.Sequential()
        model.add(
            layers.Conv2D(64, (5, 5), strides=(2, 2), padding="same", input_shape=[28, 28, 1])
        )
        model.add(layers.LeakyReLU())
        model.add(layers.Dropout(0.3))
        model.add(layers.Conv2D(128, (5, 5), strides=(2, 2), padding="same"))
        model.add(layers.LeakyReLU())
        model.add(layers.Dropout(0.3))
        model.add(layers.Flatten())
        model.add(layers.Dense(1))
        return model

    generator = make_generator_model()
    discriminator = make_discriminator_model()
    cross_entropy = tf.keras.losses.BinaryCrossentropy(from_logits=True)

    def discriminator_loss(real_output, fake_output):
        real_loss = cross_entropy(tf.ones_like(real_output), real_output)
        fake_loss = cross_entropy(tf.zeros_like(fake_output), fake_output)
        return real_loss + fake_loss

    def generator_loss(fake_output):
        return cross_entropy(tf.ones_like(fake_output), fake_output)

    generator_optimizer = tf.keras.optimizers.Adam(1e-4)
    discriminator_optimizer = tf.keras.optimizers.Adam(1e-4)

    @tf.function
    def train_step(images):
        noise = tf.random.normal([BATCH, NOISE_DIM])
        with tf.GradientTape() as gen_tape, tf.GradientTape() as disc_tape:
            generated_images = generator(noise, training=True)
            real_output = discriminator(images, training=True)
            fake_output = discriminator(generated_images, training=True)
            gen_loss = generator_loss(fake_output)
            disc_loss = discriminator_loss(real_output, fake_output)
        gradients_of_generator = gen_tape.gradient(gen_loss, generator.trainable_variables)
        gradients_of_discriminator = disc_tape.gradient(
            disc_loss, discriminator.trainable_variables
        )
        generator_optimizer.apply_gradients(
            zip(gradients_of_generator, generator.trainable_variables)  # noqa: B905
        )
        discriminator_optimizer.apply_gradients(
            zip(gradients_of_discriminator, discriminator.trainable_variables)  # noqa: B905
        )
        return gen_loss

    # The tutorial: (images - 127.5) / 127.5 as float32, shuffle(60000), batch(256).
    images = (train_images.reshape(-1, 28, 28, 1).astype("float32") - 127.5) / 127.5
    dataset = tf.data.Dataset.from_tensor_slices(images).shuffle(60000).batch(BATCH)
    batches = iter(dataset.repeat())

    def step():
        return float(train_step(next(batches)))

    return step, generator


# ----------------------------------------------------------------------------- ours


def build_ours(cfg, dataset_dir: Path):
    """The train stage's set-up for `cfg`, as run_train does it: seed, strategy, the cached
    data, precision policy, models and compiled step. Returns (stage module, strategy,
    images, size, gan, train_step); benchmarks/quality_vs_tutorial.py uses it too."""
    # The stage module first: it sets the stage's process settings before TensorFlow loads.
    from components import train as stage  # noqa: I001
    import keras

    keras.utils.set_random_seed(cfg.seed)
    strategy = stage.make_strategy(cfg.train.strategy)
    images, size = stage.load_images(dataset_dir)
    policy = stage.resolve_precision(cfg.train.mixed_precision)
    with strategy.scope():
        gan = stage.build_gan(cfg, policy)
    print(f"ours: policy {policy}, {type(strategy).__name__}", file=sys.stderr)
    return stage, strategy, images, size, gan, stage.make_train_step(gan, strategy, cfg.train)


def ours_worker(dataset_dir: Path):
    """The train stage's step and pipeline, with the tutorial's model size and batch."""
    from components.config import load_config

    cfg = load_config(REPO_ROOT / "params.yaml")
    tutorial_size = dict(
        batch_size=BATCH, latent_dim=NOISE_DIM, generator_width=256, discriminator_width=64,
        dropout=0.3,
    )  # fmt: skip
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update=tutorial_size)})
    stage, strategy, images, size, gan, train_step = build_ours(cfg, dataset_dir)
    batches = stage.epoch_batches(images, size, BATCH, cfg.seed, 1).repeat()
    iterator = iter(strategy.experimental_distribute_dataset(batches))

    def step():
        return float(train_step(next(iterator))[0])

    def profile():
        _profile(gan, step)

    return step, profile


def _profile(gan, full_step) -> None:
    """Time the parts of one step: where does it go?"""
    import tensorflow as tf

    generator, discriminator = gan.generator, gan.discriminator
    noise = tf.random.normal([BATCH, NOISE_DIM])
    fake = generator(noise, training=False)

    @tf.function
    def g_forward():
        return generator(noise, training=True)

    @tf.function
    def g_forward_backward():
        with tf.GradientTape() as tape:
            out = tf.reduce_sum(generator(noise, training=True))
        return tape.gradient(out, generator.trainable_variables)

    @tf.function
    def d_forward_backward():
        with tf.GradientTape() as tape:
            tape.watch(fake)
            out = tf.reduce_sum(discriminator(fake, training=True))
        return tape.gradient(out, [fake, *discriminator.trainable_variables])

    layer_parts = {}
    for layer in generator.layers:
        if isinstance(layer, tf.keras.layers.Conv2DTranspose | tf.keras.layers.Dense):
            x = tf.random.normal([BATCH, *layer.input.shape[1:]])

            @tf.function
            def layer_step(layer=layer, x=x):
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    out = tf.reduce_sum(layer(x))
                return tape.gradient(out, [x, *layer.trainable_variables])

            layer_parts[f"  G {layer.name} {tuple(layer.output.shape[1:])} fwd+bwd"] = layer_step

    parts = {
        "full train step": full_step,
        "G forward": g_forward,
        "G forward+backward": g_forward_backward,
        **layer_parts,
        "D forward+backward (one batch)": d_forward_backward,
    }
    print("where the time of our step goes (ms per batch of 256, median of 5):", file=sys.stderr)
    for name, fn in parts.items():
        for _ in range(2):
            tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, fn())
        times = []
        for _ in range(5):
            began = time.perf_counter()
            tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, fn())
            times.append(time.perf_counter() - began)
        print(f"  {name:45s} {1000 * statistics.median(times):8.1f}", file=sys.stderr)


def worker_main(kind: str, dataset_dir: Path) -> None:
    """Serve requests on stdin: `run N` times N steps, answered with one JSON line;
    `profile` prints the breakdown of our step (stderr) and answers `{}`."""
    sys.path.insert(0, str(REPO_ROOT))
    if kind == "tutorial":
        import tensorflow_datasets as tfds

        data = tfds.as_numpy(
            tfds.builder_from_directory(str(dataset_dir)).as_dataset(split="train", batch_size=-1)
        )
        (step, _), profile = tutorial_worker(data["image"]), None
    else:
        step, profile = ours_worker(dataset_dir)
    for line in sys.stdin:
        if line.strip() == "profile":
            profile()
            print("{}", flush=True)
            continue
        count = int(line.split()[1])
        began = time.perf_counter()
        for _ in range(count):
            loss = step()  # float(): waits for the step to finish
        seconds = time.perf_counter() - began
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        answer = {"seconds": seconds, "images": count * BATCH, "loss": loss, "peak_mib": peak_mib}
        print(json.dumps(answer), flush=True)


# ----------------------------------------------------------------------------- the driver


class Worker:
    def __init__(self, kind: str, dataset_dir: Path):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO_ROOT))
        if kind == "tutorial":
            env.pop("TF_ENABLE_ONEDNN_OPTS", None)  # TensorFlow's default, as a user has it
        command = [sys.executable, __file__, "--worker", kind, "--dataset-dir", str(dataset_dir)]
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip

    def run(self, steps: int) -> dict:
        return self.ask(f"run {steps}")

    def ask(self, request: str) -> dict:
        self.process.stdin.write(request + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"benchmark worker died (exit {self.process.wait()})")
        return json.loads(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="steps per worker per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per worker")
    parser.add_argument("--profile", action="store_true", help="break our step down")
    parser.add_argument("--dataset-dir", type=Path, default=REPO_ROOT / "data/fashion_mnist/3.0.1")
    parser.add_argument("--worker", choices=["tutorial", "ours"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker, args.dataset_dir)
        return
    if not args.dataset_dir.is_dir():
        raise SystemExit(f"{args.dataset_dir}: no dataset; run `dvc repro ingest` first")
    if min(args.rounds, args.steps) < 1:
        raise SystemExit("--rounds and --steps must be at least 1")

    workers = {kind: Worker(kind, args.dataset_dir) for kind in ("tutorial", "ours")}
    rates: dict[str, list[float]] = {kind: [] for kind in workers}
    peaks: dict[str, float] = {}
    try:
        for worker in workers.values():
            worker.run(args.warmup)  # tracing, first-call allocations, the dataset cache
        for round_ in range(1, args.rounds + 1):
            for kind, worker in workers.items():
                answer = worker.run(args.steps)
                rates[kind].append(answer["images"] / answer["seconds"])
                peaks[kind] = answer["peak_mib"]
                print(f"round {round_} {kind:8s} {rates[kind][-1]:7.1f} images/s", flush=True)
        if args.profile:  # alone on the CPU, like the timed rounds
            workers["ours"].ask("profile")
    finally:
        for worker in workers.values():
            worker.close()
    ours, tutorial = statistics.median(rates["ours"]), statistics.median(rates["tutorial"])
    print(f"tutorial: {tutorial:.1f} images/s  (peak memory {peaks['tutorial']:.0f} MiB)")
    print(f"ours:     {ours:.1f} images/s  (peak memory {peaks['ours']:.0f} MiB)")
    print(f"ratio:    {ours / tutorial:.2f}x  (same model, batch {BATCH}, {os.cpu_count()} CPUs)")
    result = {
        "ours_images_per_sec": round(ours, 1),
        "tutorial_images_per_sec": round(tutorial, 1),
        "ratio": round(ours / tutorial, 3),
        "ours_peak_mib": round(peaks["ours"]),
        "tutorial_peak_mib": round(peaks["tutorial"]),
        "batch_size": BATCH,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
