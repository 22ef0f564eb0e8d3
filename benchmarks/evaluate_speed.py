"""Evaluation time: the evaluate stage on 10,000 samples, end to end, as DVC runs it.

Usage: python benchmarks/evaluate_speed.py [--runs 3] [--samples samples/samples.npz]

Times `python -m components.evaluate` (TensorFlow's import, the classifier, the test split
and 10,000 real training images for the floor, features of all 30,000 images, every
metric twice: samples and floor) `--runs` times and prints the median against the 30 s
target. Uses generate's samples/samples.npz when it exists; otherwise a stand-in set of
10,000 real test-split-sized images (the time does not depend on what the images show).
Outputs go to a scratch folder; the workspace is not touched. Needs the classifier and
the validated data: `dvc repro classifier validate` (`make bench` runs it). The last line
is one JSON object with the key `seconds`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 30.0


def stand_in_samples(out: Path, count: int) -> Path:
    """`count` real training images (from the end of the split) as a samples.npz."""
    sys.path.insert(0, str(REPO_ROOT))
    from components.example_stats import read_split
    from components.generate import npz_bytes
    from components.validate import DEFAULT_DATASET_DIR

    images, _ = read_split(REPO_ROOT / DEFAULT_DATASET_DIR, "train")
    out.write_bytes(npz_bytes(images=images[-count:]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--samples", type=Path, default=REPO_ROOT / "samples/samples.npz")
    args = parser.parse_args()
    if args.runs < 1:
        raise SystemExit("--runs must be at least 1")
    for needed in ("models/classifier.keras", "reports/validation/summary.json"):
        if not (REPO_ROOT / needed).exists():
            raise SystemExit(f"{needed}: missing; run `dvc repro classifier validate` first")

    with tempfile.TemporaryDirectory(prefix="evaluate-speed-") as scratch:
        scratch = Path(scratch)
        samples = args.samples
        if not samples.is_file():
            print(f"{samples} not found: timing a stand-in of 10000 real images", flush=True)
            samples = stand_in_samples(scratch / "samples.npz", 10_000)
        command = [
            sys.executable, "-m", "components.evaluate", "--samples", str(samples),
            "--metrics", str(scratch / "metrics.json"),
            "--histogram", str(scratch / "class_histogram.json"),
            "--class-grid", str(scratch / "class_grid.png"),
        ]  # fmt: skip
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        times = []
        for run in range(1, args.runs + 1):
            began = time.perf_counter()
            completed = subprocess.run(
                command, cwd=REPO_ROOT, env=env, capture_output=True, text=True
            )
            seconds = time.perf_counter() - began
            if completed.returncode != 0:
                raise SystemExit(f"the evaluate stage failed:\n{completed.stderr}")
            phases = [line for line in completed.stdout.splitlines() if "features in" in line]
            print(f"run {run}: {seconds:.1f} s ({phases[0].split(': ', 1)[1] if phases else ''})")
            times.append(seconds)
        count = json.loads((scratch / "metrics.json").read_text())["setup"]["samples"]

    median = statistics.median(times)
    print(f"evaluate, {count} samples: {median:.1f} s median of {args.runs} (target: under "
          f"{TARGET_SECONDS:.0f} s)")  # fmt: skip
    print(json.dumps({
        "seconds": round(median, 1), "target_seconds": TARGET_SECONDS, "samples": count,
        "runs": [round(t, 1) for t in times],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
