"""Time the validate stage on the full dataset (60,000 + 10,000 examples).

Measures `python -m components.validate` end to end, as `dvc repro` runs it (process
start, imports, reading, Great Expectations, Data Docs), `--repeat` times, and the same
work done one step after the other in one process (TensorFlow loads and reads the data,
then Great Expectations loads): the baseline the stage's overlap beats.

    python benchmarks/validate_speed.py [--repeat 3]

Needs the ingested dataset (`dvc repro ingest`). Reports go to a temporary folder, so
reports/validation is left alone. The last line is one JSON object; `seconds` is the
median time of the stage.
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
DATASET = REPO_ROOT / "data" / "fashion_mnist" / "3.0.1"

BASELINE = """
import sys
from components import validate
from components.config import load_config
cfg = load_config()
report = validate.run_validate(
    cfg.validate, validate.expected_rows(cfg.data), out_dir=sys.argv[1], in_child=False
)
sys.exit(0 if report.passed else 1)
"""


def timed(cmd: list[str]) -> float:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO_ROOT)}
    started = time.perf_counter()
    completed = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        sys.exit(f"{' '.join(cmd[:3])} failed:\n{completed.stdout}\n{completed.stderr}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each (default 3)")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if not (DATASET / "dataset_info.json").is_file():
        sys.exit(f"no dataset at {DATASET}: run `dvc repro ingest` (or `make run`) first")

    with tempfile.TemporaryDirectory() as scratch:
        out = str(Path(scratch) / "validation")
        stage = [
            timed([sys.executable, "-m", "components.validate", "--out", out])
            for _ in range(args.repeat)
        ]
        baseline = [timed([sys.executable, "-c", BASELINE, out]) for _ in range(args.repeat)]

    print(f"{'':34} {'median':>8} {'runs'}")
    for name, runs in (("validate stage (overlapped)", stage), ("baseline (sequential)", baseline)):
        listed = ", ".join(f"{r:.1f}" for r in runs)
        print(f"{name:34} {statistics.median(runs):7.1f}s  [{listed}]")
    print(
        json.dumps(
            {
                "seconds": round(statistics.median(stage), 2),
                "baseline_seconds": round(statistics.median(baseline), 2),
                "examples": 70_000,
                "runs": [round(r, 2) for r in stage],
                "baseline_runs": [round(r, 2) for r in baseline],
                "cpus": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
