"""The Prefect flow `dcgan-pipeline`: the DVC stages as tasks, one per stage and named after
it, in the order DVC plans them from dvc.yaml; every run saved as a DVC experiment.

    python -m flows.pipeline                          # what `make run` does
    python -m flows.pipeline --set train.epochs=1 --experiment short-run

DVC stays the one cache and the one judge of what is stale: a task asks DVC whether its
stage is up to date (`dvc status`), finishes at once saying it was skipped when it is,
and otherwise runs it through `dvc repro --single-item`, streaming the stage's output into
the task's log line by line. Prefect's own result caching is off for every task.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml
from prefect import flow, get_client, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import State

from components.config import ConfigError
from flows import artifacts
from flows.workspace import (
    PipelineError,
    TransientStageFailure,
    check_experiment_name,
    check_overrides,
    find_root,
    is_native_noise,
    params_overridden,
    restore_interrupted_params,
    run_stage,
    save_experiment,
    stage_order,
    why_stale,
    workspace_lock,
)

FLOW_NAME = "dcgan-pipeline"
# The server of `make ui`. When it is up and no other API is configured, the command line
# sends its run there (it shows live in the UI); else Prefect starts a temporary one.
LOCAL_SERVER_API = "http://127.0.0.1:4200/api"
# Retries only for failures another try may not meet (flows/workspace.py TRANSIENT_ERRORS:
# DVC's lock held by a finishing command, ingest's network download); a stage's own
# failure, training's above all, fails its task at the first try.
RETRIES = 2
RETRY_DELAYS_S = [10, 30]


def only_transient(task_: Any, task_run: Any, state: State) -> bool:
    """Prefect's retry condition: retry a task only when it failed transiently."""
    return isinstance(state.data, TransientStageFailure)


_TASK_OPTIONS: dict[str, Any] = {
    "cache_policy": NO_CACHE,  # DVC is the cache
    "persist_result": False,
    "retries": RETRIES,
    "retry_delay_seconds": RETRY_DELAYS_S,
    "retry_condition_fn": only_transient,
}


@task(**_TASK_OPTIONS)
def run_dvc_stage(root: Path, stage: str, train_epochs: int) -> dict[str, Any]:
    """One DVC stage: skipped when DVC finds it up to date, else run by DVC, its output in
    this task's log. Publishes the stage's artifact (validation summary, samples, metrics)
    whether it ran or was up to date, and the validation summary also when it failed."""
    logger = get_run_logger()
    started = time.perf_counter()
    reasons = why_stale(root, stage)
    progress = artifacts.TrainingProgress(train_epochs) if stage == "train" else None
    if not reasons:
        logger.info("skipped: DVC finds stage '%s' up to date", stage)
        if progress:
            progress.start(f"{train_epochs} epochs; up to date, nothing to train", 100.0)
        _publish(root, stage)
        return {"stage": stage, "ran": False, "seconds": time.perf_counter() - started}

    logger.info("running: DVC finds stage '%s' stale: %s", stage, "; ".join(reasons))
    if progress:
        progress.start(f"training {train_epochs} epochs")

    def on_line(line: str, is_stderr: bool) -> None:
        if is_native_noise(line):
            logger.debug("%s", line)
        else:
            (logger.warning if is_stderr else logger.info)("%s", line)
        if progress:
            progress.feed(line)

    try:
        run_stage(root, stage, on_line)
    finally:
        _publish(root, stage)  # a failed validation's report is worth the most
    if progress:
        progress.finish(f"{train_epochs} epochs trained")
    seconds = time.perf_counter() - started
    logger.info("stage '%s' done in %.1f s", stage, seconds)
    return {"stage": stage, "ran": True, "seconds": seconds}


def _publish(root: Path, stage: str) -> None:
    publisher = artifacts.PUBLISHERS.get(stage)
    if publisher is None:
        return
    try:
        publisher(root)
    except Exception as exc:  # the UI's view must never fail the pipeline
        get_run_logger().warning("could not publish the %s artifact: %s", stage, exc)


@task(name="save-experiment", task_run_name="save-experiment", **_TASK_OPTIONS)
def save_run_as_experiment(root: Path, name: str, message: str) -> dict[str, Any]:
    """The workspace as DVC experiment `name`, pushed to the DVC remote when there is one."""
    logger = get_run_logger()
    saved = save_experiment(root, name, message)
    where = f"pushed {saved.pushed_files} new file(s) to {saved.remote}" if saved.remote else (
        "no DVC remote configured, nothing pushed"
    )  # fmt: skip
    logger.info("saved as DVC experiment '%s' (%s); %s", name, saved.rev[:12], where)
    return {"name": saved.name, "rev": saved.rev, "remote": saved.remote}


def default_experiment_name(run_name: str, run_id: str) -> str:
    """The flow run's name and the start of its id: unique, and it names the flow run."""
    return f"{run_name}-{run_id[:8]}"


def _tag_flow_run(run_id: str, experiment: str) -> None:
    """The flow run names its experiment: a tag, shown and filterable in the UI."""
    with get_client(sync_client=True) as client:
        tags = list(flow_run.tags or [])
        client.update_flow_run(flow_run_id=run_id, tags=[*tags, f"experiment:{experiment}"])


@flow(name=FLOW_NAME, persist_result=False, validate_parameters=True)
def dcgan_pipeline(
    overrides: dict[str, Any] | None = None, experiment: str | None = None
) -> dict[str, Any]:
    """Ingest, validate, train, classify, generate and evaluate through DVC, in its DAG's
    order; save the run as a DVC experiment.

    overrides: dotted params.yaml keys to values for this run only, e.g.
        {"train.epochs": 1}; checked against the params schema before any stage runs.
    experiment: the name to save the run under (default: the flow run's name and id).
    """
    logger = get_run_logger()
    root = find_root()
    overrides = dict(overrides or {})
    run_name, run_id = flow_run.name, str(flow_run.id)
    name = experiment or default_experiment_name(run_name, run_id)
    with workspace_lock(root, f"flow run {run_name}"):
        if restore_interrupted_params(root):
            logger.warning("params.yaml restored: a killed run had left its overrides in it")
        cfg = check_overrides(root, overrides)  # ConfigError names the key; nothing ran yet
        check_experiment_name(root, name)
        _tag_flow_run(run_id, name)
        stages = stage_order(root)
        logger.info("stages in DVC's order: %s; experiment '%s'", ", ".join(stages), name)
        if overrides:
            logger.info("overrides for this run: %s", overrides)
        with params_overridden(root, overrides):
            outcomes = [
                run_dvc_stage.with_options(name=stage, task_run_name=stage)(
                    root, stage, cfg.train.epochs
                )
                for stage in stages
            ]
            message = f"{FLOW_NAME} flow run {run_name} ({run_id})"
            saved = save_run_as_experiment(root, name, message)
    artifacts.publish_experiment(name, run_name, saved["rev"], saved["remote"])
    ran = [o["stage"] for o in outcomes if o["ran"]]
    logger.info("ran: %s; skipped (up to date): %s", ", ".join(ran) or "none",
                ", ".join(o["stage"] for o in outcomes if not o["ran"]) or "none")  # fmt: skip
    return {"experiment": name, "stages": {o["stage"]: o["ran"] for o in outcomes}}


# ----------------------------------------------------------------------------- command line


def parse_set_options(items: Sequence[str]) -> dict[str, Any]:
    """`--set train.epochs=1` options as overrides; each value is read as YAML (1, 0.5,
    true, null, text)."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.epochs=1")
        try:
            overrides[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"--set {item!r}: the value is not valid YAML: {exc}") from None
    return overrides


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.pipeline",
        description=f"Run the Prefect flow {FLOW_NAME} (every DVC stage, in DAG order) in "
        "this workspace and save the run as a DVC experiment.",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="a params.yaml key for this run only (repeatable), e.g. --set train.epochs=1",
    )  # fmt: skip
    parser.add_argument(
        "--experiment", help="name to save the run under (default: the flow run's name)"
    )
    args = parser.parse_args(argv)
    try:  # refuse bad input before Prefect starts its server
        overrides = parse_set_options(args.overrides)
        root = find_root()
        check_overrides(root, overrides)
        if args.experiment:
            check_experiment_name(root, args.experiment)
    except (ValueError, ConfigError, PipelineError) as exc:
        print(f"pipeline: error: {exc}", file=sys.stderr)
        return 2
    server = running_local_server()
    with temporary_settings({PREFECT_API_URL: server}) if server else contextlib.nullcontext():
        if server:
            print(f"pipeline: recording the run on the Prefect server at {server} (make ui)")
        state = dcgan_pipeline(overrides=overrides, experiment=args.experiment, return_state=True)
    return 0 if state.is_completed() else 1


def running_local_server(api: str = LOCAL_SERVER_API) -> str | None:
    """`api` when no Prefect API is configured and a server answers there, else None."""
    if PREFECT_API_URL.value():
        return None
    try:
        httpx.get(f"{api}/health", timeout=0.5).raise_for_status()
    except httpx.HTTPError:
        return None
    return api


if __name__ == "__main__":
    sys.exit(main())
