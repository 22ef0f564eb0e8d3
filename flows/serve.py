"""Serve the deployment `dcgan-pipeline/nightly`: the flow on the cron schedule of
params.yaml's `schedule` section, one run at a time.

    make ui       # terminal 1: the Prefect server and UI on http://127.0.0.1:4200
    make serve    # terminal 2: this process; it starts scheduled and triggered runs
    prefect deployment run dcgan-pipeline/nightly --param overrides='{"train.epochs": 1}'

Runs execute in this workspace (the folder `make serve` was started in), as subprocesses
of this process. A run that becomes due while another is active is cancelled or queued
(`schedule.on_collision`), never run beside it: all runs share the workspace.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import httpx
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.schedules import Cron

from components.config import ConfigError, ScheduleConfig, load_config
from flows.pipeline import dcgan_pipeline
from flows.workspace import PARAMS_FILE, PipelineError, find_root

DEPLOYMENT_NAME = "nightly"
COLLISION = {
    "cancel": ConcurrencyLimitStrategy.CANCEL_NEW,
    "enqueue": ConcurrencyLimitStrategy.ENQUEUE,
}


def concurrency(schedule: ScheduleConfig) -> ConcurrencyLimitConfig:
    """One active run per deployment; the one that collides is cancelled or queued."""
    return ConcurrencyLimitConfig(limit=1, collision_strategy=COLLISION[schedule.on_collision])


def require_server() -> str:
    """The Prefect API this process serves against; a served deployment outlives no
    temporary server, so there must be a real one."""
    url = os.environ.get("PREFECT_API_URL", "")
    if not url:
        raise PipelineError(
            "PREFECT_API_URL is not set: start the server with `make ui`, then serve with "
            "`make serve` (it sets PREFECT_API_URL=http://127.0.0.1:4200/api)"
        )
    try:
        httpx.get(f"{url.rstrip('/')}/health", timeout=5).raise_for_status()
    except httpx.HTTPError as exc:
        raise PipelineError(
            f"no Prefect server answers at {url} ({exc}); start it with `make ui`"
        ) from None
    return url


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.serve",
        description=f"Serve deployment dcgan-pipeline/{DEPLOYMENT_NAME} against PREFECT_API_URL.",
    )
    parser.add_argument("--params", type=Path, default=None, help="params file")
    args = parser.parse_args(argv)
    try:
        root = find_root()
        schedule_cfg = load_config(args.params or root / PARAMS_FILE).schedule
        url = require_server()
    except (ConfigError, PipelineError) as exc:
        print(f"serve: error: {exc}", file=sys.stderr)
        return 2
    fate = {"cancel": "cancelled", "enqueue": "queued"}[schedule_cfg.on_collision]
    print(f"serve: {url}; schedule {schedule_cfg.cron} ({schedule_cfg.timezone}); a run due "
          f"while another is active is {fate}; workspace {root}")  # fmt: skip
    os.chdir(root)  # runs execute in the workspace, whatever folder this started in
    dcgan_pipeline.serve(
        name=DEPLOYMENT_NAME,
        schedule=Cron(schedule_cfg.cron, timezone=schedule_cfg.timezone),
        global_limit=concurrency(schedule_cfg),
        description="The DCGAN pipeline on its schedule (params.yaml: schedule).",
        tags=["dcgan"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
