"""No-op run time: the flow `dcgan-pipeline` when DVC finds every stage up to date.

Usage: python benchmarks/noop_run.py [--runs 3] [--api URL]

Times `python -m flows.pipeline` in this workspace `--runs` times, with Prefect's embedded
default (a temporary local API per run, as `make run`) or against a running server
(`--api http://127.0.0.1:4200/api`, as a served deployment's runs), and prints for each:
the whole command's wall time, and the flow run's own time (from its "Beginning flow run"
to its "Finished in state" log lines: DVC's status of six stages, the experiment saved and
pushed, the artifacts). Beside them, the baseline: a no-op `dvc repro` alone. Each run saves
an experiment (`noop-bench-...`); they are removed at the end. Needs an up-to-date
workspace (`make run` first). The last line is one JSON object; target: under 20 s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 20.0
_STAMP = re.compile(
    r"^(\d\d:\d\d:\d\d\.\d+) \| .*Flow run '[^']+' - (Beginning flow run|Finished in state)"
)


def flow_seconds(output: str) -> float:
    """Seconds between the flow run's first and last log lines."""
    stamps = [datetime.strptime(m[1], "%H:%M:%S.%f") for line in output.splitlines()
              if (m := _STAMP.match(line))]  # fmt: skip
    if len(stamps) < 2:
        raise SystemExit(f"no flow run start/end in the output:\n{output[-3000:]}")
    return (stamps[-1] - stamps[0]).total_seconds() % 86_400


def timed(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    began = time.perf_counter()
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return seconds, done.stdout + done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--api", help="a running Prefect server's API URL (default: embedded)")
    args = parser.parse_args()
    if args.runs < 1:
        raise SystemExit("--runs must be at least 1")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    if args.api:
        env["PREFECT_API_URL"] = args.api
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=REPO_ROOT,
                            capture_output=True, text=True).stdout  # fmt: skip
    if "up to date" not in status:
        raise SystemExit(f"the workspace is not up to date; run `make run` first:\n{status}")

    walls, flows, repros, names = [], [], [], []
    try:
        for run in range(1, args.runs + 1):
            name = f"noop-bench-{int(time.time())}-{run}"
            names.append(name)
            command = [sys.executable, "-m", "flows.pipeline", "--experiment", name]
            wall, output = timed(command, env)
            if "ran: none" not in output:
                raise SystemExit(f"a stage ran: not a no-op run\n{output[-3000:]}")
            walls.append(wall)
            flows.append(flow_seconds(output))
            repros.append(timed([sys.executable, "-m", "dvc", "repro"], env)[0])
            print(f"run {run}: command {wall:.1f} s, flow run {flows[-1]:.1f} s; "
                  f"no-op dvc repro {repros[-1]:.1f} s", flush=True)  # fmt: skip
    finally:
        subprocess.run([sys.executable, "-m", "dvc", "exp", "remove", *names], cwd=REPO_ROOT,
                       capture_output=True)  # fmt: skip

    where = f"server {args.api}" if args.api else "embedded Prefect (make run)"
    result = {
        "flow_run_seconds": round(statistics.median(flows), 1),
        "command_seconds": round(statistics.median(walls), 1),
        "dvc_repro_seconds": round(statistics.median(repros), 1),
        "target_seconds": TARGET_SECONDS,
        "prefect_api": args.api or "embedded",
        "runs": args.runs,
    }
    print(f"no-op run, {where}: flow run {result['flow_run_seconds']} s, whole command "
          f"{result['command_seconds']} s (target < {TARGET_SECONDS:.0f} s); baseline "
          f"`dvc repro` alone {result['dvc_repro_seconds']} s")  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
