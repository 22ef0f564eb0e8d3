"""Sample quality in equal time: our default recipe against TensorFlow's DCGAN tutorial.

Usage: python benchmarks/quality_vs_tutorial.py [--budget-seconds 600] [--samples 10000]

Each recipe trains in its own process, on this machine, for the same wall-clock budget
(counted from its first training step, so graph tracing is included; TensorFlow's import
and the data loading are not), one after the other so that neither competes with the
other for the cores. Then each draws `--samples` images from seeded noise, and the
project's evaluator (components/evaluate.py: the classifier's features, the test split)
scores both, beside the floor of real training images.

- `tutorial`: tensorflow.org/tutorials/generative/dcgan as a user runs it (the code in
  benchmarks/train_throughput.py: its models, Adam(1e-4) with beta_1 0.9, batch 256, its
  input pipeline, TensorFlow's default settings), sampled from its generator.
- `ours`: the train stage's code with the train section of params.yaml (the default
  recipe: smaller models at batch 64, Adam 2e-4 / 0.5, the generator's weight average,
  oneDNN), sampled from the weight average as `models/generator.keras` would be.

Needs the data and the classifier: `dvc repro ingest validate classifier` (`make bench`
runs it). The last line is one JSON object with `fid_ours`, `fid_tutorial`, `fid_floor`,
`budget_seconds` (and more).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASET_DIR = REPO_ROOT / "data/fashion_mnist/3.0.1"
CLASSIFIER = REPO_ROOT / "models/classifier.keras"
SUMMARY = REPO_ROOT / "reports/validation/summary.json"


# ----------------------------------------------------------------------------- workers


def _train_for(step, budget: float) -> tuple[int, float]:
    """Call step() until `budget` seconds have passed; return (steps, seconds)."""
    began, steps = time.perf_counter(), 0
    while time.perf_counter() - began < budget:
        step()  # returns a float: the step has finished
        steps += 1
    return steps, time.perf_counter() - began


def tutorial_run(budget: float) -> tuple[object, int, float, int]:
    import tensorflow_datasets as tfds
    from train_throughput import BATCH, tutorial_worker

    data = tfds.as_numpy(
        tfds.builder_from_directory(str(DATASET_DIR)).as_dataset(split="train", batch_size=-1)
    )
    step, generator = tutorial_worker(data["image"])
    steps, seconds = _train_for(step, budget)
    return generator, steps, seconds, BATCH


def ours_run(budget: float) -> tuple[object, int, float, int]:
    from train_throughput import build_ours

    from components.config import load_config

    cfg = load_config(REPO_ROOT / "params.yaml")
    train = cfg.train
    stage, strategy, images, size, gan, train_step = build_ours(cfg, DATASET_DIR)

    def batches():
        epoch = 0
        while True:
            epoch += 1
            yield from strategy.experimental_distribute_dataset(
                stage.epoch_batches(images, size, train.batch_size, cfg.seed, epoch)
            )

    stream = batches()
    steps, seconds = _train_for(lambda: float(train_step(next(stream))[0]), budget)
    return gan.sampler, steps, seconds, train.batch_size


def worker_main(kind: str, budget: float, count: int, out: Path) -> None:
    sys.path.insert(0, str(REPO_ROOT))
    generator, steps, seconds, batch = (tutorial_run if kind == "tutorial" else ours_run)(budget)
    from components.generate import generate_images, npz_bytes
    from components.latents import SAMPLES_STREAM, standard_normal

    latent_dim = int(generator.input_shape[-1])
    samples = generate_images(generator, standard_normal(42, SAMPLES_STREAM, count, latent_dim))
    out.write_bytes(npz_bytes(images=samples))
    summary = {"steps": steps, "seconds": seconds, "images_seen": steps * batch}
    print(json.dumps(summary), flush=True)


# ----------------------------------------------------------------------------- driver


def run_worker(kind: str, budget: float, count: int, out: Path) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(REPO_ROOT))
    if kind == "tutorial":
        env.pop("TF_ENABLE_ONEDNN_OPTS", None)  # TensorFlow's default, as a user has it
    command = [
        sys.executable, __file__, "--worker", kind, "--budget-seconds", str(budget),
        "--samples", str(count), "--out", str(out),
    ]  # fmt: skip
    print(f"{kind}: training for {budget:.0f} s ...", file=sys.stderr, flush=True)
    completed = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"the {kind} worker failed (exit {completed.returncode})")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-seconds", type=float, default=600.0)
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--keep-dir", type=Path, help="keep both sample sets (npz) here")
    parser.add_argument("--worker", choices=["tutorial", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker, args.budget_seconds, args.samples, args.out)
        return
    if args.budget_seconds <= 0 or args.samples < 10:
        raise SystemExit("--budget-seconds must be > 0 and --samples at least 10")
    for needed in (DATASET_DIR, CLASSIFIER, SUMMARY):
        if not needed.exists():
            raise SystemExit(f"{needed}: missing; run `dvc repro ingest validate classifier`")

    import tempfile

    keep = args.keep_dir or Path(tempfile.mkdtemp(prefix="quality-"))
    keep.mkdir(parents=True, exist_ok=True)
    runs = {}
    for kind in ("tutorial", "ours"):
        runs[kind] = run_worker(kind, args.budget_seconds, args.samples, keep / f"{kind}.npz")

    sys.path.insert(0, str(REPO_ROOT))
    from components import evaluate
    from components.config import load_config
    from components.example_stats import read_split

    cfg = load_config(REPO_ROOT / "params.yaml")
    evaluate.require_validated(SUMMARY, DATASET_DIR)
    embed = evaluate.embed_with(cfg.evaluate, CLASSIFIER)
    reference = embed(read_split(DATASET_DIR, "test")[0])
    floor = evaluate.score(
        embed(read_split(DATASET_DIR, "train", cfg.evaluate.real_images)[0]), reference,
        cfg.evaluate, cfg.seed,
    )  # fmt: skip
    scores = {
        kind: evaluate.score(
            embed(evaluate.load_samples(keep / f"{kind}.npz")), reference, cfg.evaluate, cfg.seed
        )
        for kind in runs
    }

    print(f"\nequal budget: {args.budget_seconds:.0f} s of training each, on this machine")
    print(f"{'':10s} {'steps':>7s} {'images':>9s} {'FID':>8s} {'KID':>8s} {'prec.':>6s} "
          f"{'recall':>6s} {'cover.':>6s} {'IS':>6s}")  # fmt: skip
    for kind, figures in [*scores.items(), ("floor", floor)]:
        run = runs.get(kind, {"steps": 0, "images_seen": 0})
        print(
            f"{kind:10s} {run['steps']:7d} {run['images_seen']:9d} {figures['fid']:8.3f} "
            f"{figures['kid']['mean']:8.4f} {figures['precision']:6.3f} {figures['recall']:6.3f} "
            f"{figures['coverage']:6.3f} {figures['inception_score']['mean']:6.2f}"
        )
    ratio = scores["ours"]["fid"] / scores["tutorial"]["fid"]
    print(f"FID ours / tutorial: {ratio:.3f} (goal: at most 0.35); samples in {keep}")
    result = {
        "fid_ours": round(scores["ours"]["fid"], 4),
        "fid_tutorial": round(scores["tutorial"]["fid"], 4),
        "fid_floor": round(floor["fid"], 4),
        "budget_seconds": args.budget_seconds,
        "fid_ratio": round(ratio, 4),
        "steps_ours": runs["ours"]["steps"],
        "steps_tutorial": runs["tutorial"]["steps"],
        "samples": args.samples,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
