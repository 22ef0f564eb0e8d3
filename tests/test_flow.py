"""The Prefect flow `dcgan-pipeline` end to end, on the real data in a temporary git clone
with smoke params: under `prefect_test_harness` (the flow run in this process, a real
temporary Prefect API), then served as the deployment `dcgan-pipeline/nightly` against a
real `prefect server start` on a free 127.0.0.1 port and triggered with
`prefect deployment run`. Task runs, logs and artifacts are read back through the
Prefect REST API, as the UI reads them.

Needs Debian's dataset-fashion-mnist mirror (`make test` installs it when it can).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml
from prefect.logging.handlers import APILogHandler
from prefect.settings import PREFECT_API_URL
from prefect.states import State
from prefect.testing.utilities import prefect_test_harness

from flows import artifacts
from flows.pipeline import dcgan_pipeline
from flows.workspace import PARAMS_BASELINE, stage_order
from tests.conftest import (
    SMOKE,
    clone_working_tree,
    real_sample,
    require_mirror,
    snapshot,
    use_smoke_params,
    write_tfds,
)

pytestmark = pytest.mark.integration

# The end-to-end smoke params plus 2000 training examples: every stage runs for real, the
# whole flow in ~2 minutes on 2 cores.
FLOW_SMOKE = {**SMOKE, "data": {"limit": 2000}}
ARTIFACT_KEYS = {
    artifacts.VALIDATION_KEY, artifacts.METRICS_KEY, artifacts.SAMPLES_KEY,
    artifacts.EXPERIMENT_KEY, artifacts.PROGRESS_KEY,
}  # fmt: skip
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}
# `dvc exp apply` records a git stash: git needs an identity, which CI may not have.
GIT_IDENTITY = {
    f"GIT_{role}_{part}": value
    for role in ("AUTHOR", "COMMITTER")
    for part, value in (("NAME", "test"), ("EMAIL", "test@example.invalid"))
}


# ----------------------------------------------------------------------------- Prefect API


def api_post(api: str, path: str, body: dict[str, Any]) -> Any:
    response = httpx.post(f"{api}{path}", json=body, timeout=30)
    response.raise_for_status()
    return response.json()


def api_get(api: str, path: str) -> Any:
    response = httpx.get(f"{api}{path}", timeout=30)
    response.raise_for_status()
    return response.json()


def task_runs(api: str, flow_run_id: str) -> list[dict[str, Any]]:
    """The flow run's task runs in the order they started."""
    runs = api_post(api, "/task_runs/filter",
                    {"task_runs": {"flow_run_id": {"any_": [flow_run_id]}}})  # fmt: skip
    return sorted(runs, key=lambda run: run["start_time"] or run["expected_start_time"])


def artifacts_by_key(api: str, flow_run_id: str) -> dict[str, dict[str, Any]]:
    found = api_post(api, "/artifacts/filter",
                     {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})  # fmt: skip
    return {artifact["key"]: artifact for artifact in found if artifact["key"]}


def task_logs(api: str, flow_run_id: str) -> dict[str, list[str]]:
    """Log messages by task run name ("" for the flow's own)."""
    APILogHandler().flush()  # logs travel in batches; send what is still queued
    names = {run["id"]: run["name"] for run in task_runs(api, flow_run_id)}
    logs: dict[str, list[str]] = {}
    offset = 0
    while True:
        page = api_post(api, "/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}},
                                              "sort": "TIMESTAMP_ASC", "offset": offset,
                                              "limit": 200})  # fmt: skip
        for log in page:
            logs.setdefault(names.get(log["task_run_id"], ""), []).append(log["message"])
        if len(page) < 200:
            return logs
        offset += 200


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def harness() -> Iterator[str]:
    """A temporary Prefect API for the flows run in this process (generous start-up time:
    the server starts in ~15-30 s on 2 busy cores)."""
    with prefect_test_harness(server_startup_timeout=300):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    require_mirror()
    root = tmp_path_factory.mktemp("flow")
    clone = clone_working_tree(root / "clone")
    use_smoke_params(clone, FLOW_SMOKE)
    # The run pushes to the default DVC remote: keep it in the sandbox (.dvc/config.local).
    dvc(clone, "remote", "modify", "--local", "local-store", "url", str(root / "remote"))
    return clone


def dvc(cwd: Path, *args: str, **env: str) -> str:
    command = [sys.executable, "-m", "dvc", *args]
    env = {**os.environ, **env}
    completed = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert completed.returncode == 0, f"dvc {' '.join(args)}: {completed.stdout}{completed.stderr}"
    return completed.stdout


def run_flow(workspace: Path, **parameters: Any) -> State:
    """The flow in this process, from the workspace as its working directory."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workspace)
        return dcgan_pipeline(**parameters, return_state=True)


@dataclass
class FirstRun:
    api: str
    workspace: Path
    state: State
    flow_run_id: str
    seconds: float
    interpolation: bytes  # samples/interpolation.png as this run left it


@pytest.fixture(scope="module")
def first_run(harness: str, workspace: Path) -> FirstRun:
    started = time.perf_counter()
    state = run_flow(workspace, experiment="first")
    seconds = time.perf_counter() - started
    print(f"first flow run (every stage, smoke params): {seconds:.1f} s")
    return FirstRun(harness, workspace, state, str(state.state_details.flow_run_id), seconds,
                    (workspace / "samples" / "interpolation.png").read_bytes())  # fmt: skip


def experiment_data(workspace: Path, name: str) -> dict[str, Any]:
    """`dvc exp show --json`'s record of experiment `name` (params, metrics, outputs)."""

    def find(node: Any) -> dict[str, Any] | None:
        if isinstance(node, dict):
            if node.get("name") == name and "data" in node:
                return node["data"]
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            return None
        for child in children:
            if (found := find(child)) is not None:
                return found
        return None

    found = find(json.loads(dvc(workspace, "exp", "show", "--json")))
    assert found is not None, f"experiment {name} not in dvc exp show"
    return found


def file_values(data: dict[str, Any], kind: str, path: str) -> dict[str, Any]:
    return data[kind][path]["data"]


# ----------------------------------------------------------------------------- the flow


def test_every_stage_runs_as_its_own_task_in_dvcs_order(first_run: FirstRun):
    assert first_run.state.is_completed(), first_run.state.message
    runs = task_runs(first_run.api, first_run.flow_run_id)
    stages = stage_order(first_run.workspace)
    assert [run["name"] for run in runs] == [*stages, "save-experiment"]
    assert all(run["state_type"] == "COMPLETED" for run in runs)

    logs = task_logs(first_run.api, first_run.flow_run_id)
    for stage in stages:  # each ran through DVC, its output in its own task's log
        assert any(f"DVC finds stage '{stage}' stale" in line for line in logs[stage])
        assert f"Running stage '{stage}':" in logs[stage]
    assert any(line.startswith("train: epoch 1/1 ") for line in logs["train"])
    assert any(line.startswith("validate: passed: 27 checks") for line in logs["validate"])
    assert not any("cudart_stub" in line for line in logs["train"])  # native noise: debug


def test_the_run_is_a_dvc_experiment_pushed_to_the_remote(first_run: FirstRun):
    workspace = first_run.workspace
    data = experiment_data(workspace, "first")
    metrics = json.loads((workspace / "reports" / "metrics.json").read_text())
    assert file_values(data, "metrics", "reports/metrics.json")["fid"] == metrics["fid"]
    assert file_values(data, "params", "params.yaml")["data"]["limit"] == 2000
    assert "samples" in data["outs"] and data["outs"]["samples"]["hash"]

    # The flow run and the experiment name each other.
    flow_run = api_get(first_run.api, f"/flow_runs/{first_run.flow_run_id}")
    assert "experiment:first" in flow_run["tags"]
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps/"],
                          cwd=workspace, capture_output=True, text=True).stdout.split()  # fmt: skip
    ref = next(r for r in refs if r.endswith("/first"))
    message = subprocess.run(["git", "log", "-1", "--format=%s", ref], cwd=workspace,
                             capture_output=True, text=True).stdout  # fmt: skip
    assert f"flow run {flow_run['name']} ({first_run.flow_run_id})" in message

    remote = workspace.parent / "remote"
    assert sum(1 for p in remote.rglob("*") if p.is_file()) > 10  # outputs pushed
    assert "in sync" in dvc(workspace, "status", "--cloud")  # everything pushed
    status = subprocess.run(["git", "status", "--porcelain"], cwd=workspace,
                            capture_output=True, text=True).stdout.splitlines()  # fmt: skip
    assert [line[3:] for line in status] == ["dvc.lock"]  # params.yaml as it was


def test_the_ui_gets_the_runs_artifacts(first_run: FirstRun):
    found = artifacts_by_key(first_run.api, first_run.flow_run_id)
    assert set(found) == ARTIFACT_KEYS
    workspace = first_run.workspace

    validation = found[artifacts.VALIDATION_KEY]
    assert validation["type"] == "markdown"
    assert validation["data"].startswith("## Validation passed: 27 of 27 checks")

    table = found[artifacts.METRICS_KEY]
    rows = json.loads(table["data"]) if isinstance(table["data"], str) else table["data"]
    fid = next(row for row in rows if row["metric"] == "FID")
    metrics = json.loads((workspace / "reports" / "metrics.json").read_text())
    assert fid["samples"] == f"{metrics['fid']:.4g}"
    assert fid["real-data floor"] == f"{metrics['floor']['fid']:.4g}"

    samples = found[artifacts.SAMPLES_KEY]["data"]
    encoded = re.search(r"!\[grid\.png\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", samples)
    assert base64.b64decode(encoded[1]) == (workspace / "samples" / "grid.png").read_bytes()

    experiment = found[artifacts.EXPERIMENT_KEY]["data"]
    assert "DVC experiment `first`" in experiment
    assert "dvc plots diff OTHER first --open" in experiment
    assert "dvc exp apply first && dvc checkout" in experiment

    progress = found[artifacts.PROGRESS_KEY]
    assert progress["type"] == "progress" and float(progress["data"]) == 100.0


def test_a_second_run_with_nothing_changed_skips_every_stage(first_run: FirstRun):
    workspace = first_run.workspace
    marker = workspace / "data" / "fashion_mnist" / "ingest.json"
    mtime = marker.stat().st_mtime_ns
    started = time.perf_counter()
    state = run_flow(workspace, experiment="noop")
    print(f"no-op flow run: {time.perf_counter() - started:.1f} s "
          f"(first run {first_run.seconds:.1f} s)")  # fmt: skip
    assert state.is_completed(), state.message
    flow_run_id = str(state.state_details.flow_run_id)
    logs = task_logs(first_run.api, flow_run_id)
    for stage in stage_order(workspace):
        assert logs[stage][0] == f"skipped: DVC finds stage '{stage}' up to date"
        assert not any(line.startswith("Running stage") for line in logs[stage])
    assert marker.stat().st_mtime_ns == mtime
    assert experiment_data(workspace, "noop")  # still a version of its own
    assert set(artifacts_by_key(first_run.api, flow_run_id)) == ARTIFACT_KEYS


def test_overrides_belong_to_one_run_and_its_experiment(first_run: FirstRun):
    workspace = first_run.workspace
    params = (workspace / "params.yaml").read_bytes()
    state = run_flow(workspace, overrides={"generate.interpolation_steps": 6},
                     experiment="steps6")  # fmt: skip
    assert state.is_completed(), state.message
    logs = task_logs(first_run.api, str(state.state_details.flow_run_id))
    assert "Running stage 'generate':" in logs["generate"]
    assert logs["train"][0] == "skipped: DVC finds stage 'train' up to date"
    assert (workspace / "params.yaml").read_bytes() == params  # the next run's params
    assert not (workspace / PARAMS_BASELINE).exists()
    steps6 = experiment_data(workspace, "steps6")
    assert file_values(steps6, "params", "params.yaml")["generate"]["interpolation_steps"] == 6
    assert (workspace / "samples" / "interpolation.png").read_bytes() != first_run.interpolation

    # The documented restore: the first run's samples come back.
    dvc(workspace, "exp", "apply", "first", **GIT_IDENTITY)
    dvc(workspace, "checkout")
    assert (workspace / "samples" / "interpolation.png").read_bytes() == first_run.interpolation
    assert "up to date" in dvc(workspace, "status")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train.epochs": 0}, "train.epochs: Input should be greater than or equal to 1"),
        ({"trian.epochs": 1}, "trian: unknown key"),
    ],
)
def test_a_bad_override_fails_the_run_before_any_stage(first_run: FirstRun, overrides, message):
    workspace = first_run.workspace
    params = (workspace / "params.yaml").read_bytes()
    state = run_flow(workspace, overrides=overrides)
    assert state.is_failed()
    assert message in state.message
    assert task_runs(first_run.api, str(state.state_details.flow_run_id)) == []
    assert (workspace / "params.yaml").read_bytes() == params


def copy_workspace(workspace: Path, dest: Path) -> Path:
    shutil.copytree(workspace, dest, symlinks=True)
    return dest


def test_failed_validation_fails_the_run_and_train_never_starts(first_run: FirstRun, tmp_path):
    """Bad data as from a frozen ingest (dropped in by hand): the gate stops the run."""
    gate = copy_workspace(first_run.workspace, tmp_path / "gate")
    models = snapshot(gate / "models")
    dvc(gate, "freeze", "ingest")
    sample = real_sample(300, 100)
    sample.train_labels[3] = 10
    dataset = gate / "data" / "fashion_mnist" / "3.0.1"
    shutil.rmtree(dataset)
    write_tfds(tmp_path / "bad", sample).rename(dataset)

    state = run_flow(gate, experiment="bad-data")
    assert state.is_failed()
    assert "stage 'validate' failed (dvc repro exited with" in state.message
    assert "labels_in_range" in state.message  # the stage's own error text
    flow_run_id = str(state.state_details.flow_run_id)
    runs = {run["name"]: run["state_type"] for run in task_runs(first_run.api, flow_run_id)}
    assert runs["validate"] == "FAILED"
    assert "train" not in runs and "evaluate" not in runs  # never started
    assert snapshot(gate / "models") == models

    summary = artifacts_by_key(first_run.api, flow_run_id)[artifacts.VALIDATION_KEY]["data"]
    assert summary.startswith("## Validation FAILED")
    assert "| train_examples | labels_in_range |" in summary
    assert "bad-data" not in subprocess.run(["git", "for-each-ref", "refs/exps/"], cwd=gate,
                                            capture_output=True, text=True).stdout  # fmt: skip


def latest_checkpoint(folder: Path) -> int:
    try:
        text = (folder / "checkpoint").read_text()
    except FileNotFoundError:
        return 0
    found = re.search(r'model_checkpoint_path: "ckpt-(\d+)"', text)
    return int(found[1]) if found else 0


def test_a_killed_run_starts_again_and_training_resumes(first_run: FirstRun, tmp_path):
    """The whole run (flow, DVC, the training process) killed mid-training, as by a
    power cut; the same command again resumes from the last checkpoint."""
    crash = copy_workspace(first_run.workspace, tmp_path / "crash")
    params = (crash / "params.yaml").read_bytes()
    command = [sys.executable, "-m", "flows.pipeline", "--set", "train.epochs=30"]
    env = {**os.environ, "PREFECT_API_URL": first_run.api}
    log = (tmp_path / "killed.log").open("w")
    process = subprocess.Popen(command, cwd=crash, env=env, stdout=log, stderr=subprocess.STDOUT)
    checkpoints = crash / "models" / "checkpoints"
    deadline = time.monotonic() + 300
    while latest_checkpoint(checkpoints) < 4 and time.monotonic() < deadline:
        assert process.poll() is None, (tmp_path / "killed.log").read_text()
        time.sleep(0.2)
    assert latest_checkpoint(checkpoints) >= 4, "training never reached epoch 4"
    tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    assert any("components.train" in " ".join(proc.cmdline()) for proc in tree)
    for proc in tree:
        proc.send_signal(signal.SIGKILL)
    _, alive = psutil.wait_procs(tree, timeout=30)
    assert alive == []
    assert (crash / PARAMS_BASELINE).exists()  # the killed run's overrides are still in
    assert yaml.safe_load((crash / "params.yaml").read_text())["train"]["epochs"] == 30

    again = subprocess.run(command, cwd=crash, env=env, capture_output=True, text=True)
    output = again.stdout + again.stderr
    assert again.returncode == 0, output
    assert "params.yaml restored: a killed run had left its overrides in it" in output
    resumed = re.search(r"train: resuming from epoch (\d+)", output)
    assert resumed and int(resumed[1]) >= 4, output
    history = json.loads((checkpoints / "history.json").read_text())
    assert [record["epoch"] for record in history] == list(range(1, 31))
    assert (crash / "params.yaml").read_bytes() == params
    assert not (crash / PARAMS_BASELINE).exists()


# ----------------------------------------------------------------------------- the deployment


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check, timeout: float, what: str, process: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            pytest.fail(f"{what}: the process exited with {process.returncode}")
        try:
            if (result := check()) is not None:
                return result
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"{what}: not after {timeout} s")


@dataclass
class Server:
    api: str
    env: dict[str, str]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    """`prefect server start` on a free 127.0.0.1 port, with its own database."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
               PREFECT_RUNNER_POLL_FREQUENCY="2")  # fmt: skip
    log = (home / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
         "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    api = env["PREFECT_API_URL"]
    try:
        wait_for(lambda: api_get(api, "/health") or None, 240, "prefect server start", process)
        yield Server(api, env)
    finally:
        process.terminate()
        process.wait(timeout=60)


@pytest.fixture(scope="module")
def served(server: Server, first_run: FirstRun) -> Iterator[Server]:
    """`python -m flows.serve` (what `make serve` runs) in the workspace."""
    log = (first_run.workspace.parent / "serve.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "flows.serve"], cwd=first_run.workspace,
                               env=server.env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_for(lambda: api_get(server.api, "/deployments/name/dcgan-pipeline/nightly"),
                 120, "the deployment", process)  # fmt: skip
        yield server
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def trigger(server: Server, *params: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "prefect", "deployment", "run", "dcgan-pipeline/nightly"]
    for param in params:
        command += ["--param", param]
    return subprocess.Popen(command, env=server.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


def flow_run_id_of(triggered: subprocess.Popen) -> str:
    output, _ = triggered.communicate(timeout=120)
    assert triggered.returncode == 0, output
    return re.search(r"UUID: ([0-9a-f-]{36})", output)[1]


def wait_until_over(server: Server, flow_run_id: str) -> dict[str, Any]:
    def over() -> dict[str, Any] | None:
        run = api_get(server.api, f"/flow_runs/{flow_run_id}")
        return run if run["state_type"] in TERMINAL else None

    return wait_for(over, 600, f"flow run {flow_run_id}")


def test_the_deployment_runs_on_a_real_server(served: Server, first_run: FirstRun):
    deployment = api_get(served.api, "/deployments/name/dcgan-pipeline/nightly")
    assert deployment["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
    assert deployment["global_concurrency_limit"]["limit"] == 1

    flow_run_id = flow_run_id_of(trigger(served, 'overrides={"train.epochs": 1}'))
    run = wait_until_over(served, flow_run_id)
    assert run["state_type"] == "COMPLETED", run["state"]
    assert run["parameters"]["overrides"] == {"train.epochs": 1}
    runs = task_runs(served.api, flow_run_id)
    stages = stage_order(first_run.workspace)
    assert [r["name"] for r in runs] == [*stages, "save-experiment"]
    assert all(r["state_type"] == "COMPLETED" for r in runs)
    logs = task_logs(served.api, flow_run_id)
    assert all(logs[s][0] == f"skipped: DVC finds stage '{s}' up to date" for s in stages)
    assert set(artifacts_by_key(served.api, flow_run_id)) == ARTIFACT_KEYS
    experiment = next(tag for tag in run["tags"] if tag.startswith("experiment:"))
    assert experiment == f"experiment:{run['name']}-{flow_run_id[:8]}"


def test_a_second_run_while_one_is_active_is_cancelled(served: Server):
    both = [trigger(served), trigger(served)]
    finished = [wait_until_over(served, flow_run_id_of(t)) for t in both]
    states = sorted(run["state_type"] for run in finished)
    assert states == ["CANCELLED", "COMPLETED"], [run["state"] for run in finished]
    cancelled = next(run for run in finished if run["state_type"] == "CANCELLED")
    assert "concurrency limit" in cancelled["state"]["message"]
