"""The flow's side of the DVC workspace: the DAG's order, what is stale, one stage run with
its output streamed line by line, the run's params overrides, and the run saved as a DVC
experiment and pushed.

Plain Python over DVC: its Python API where it answers a question (order, status,
experiments, push), its command line where a stage must run (`dvc repro --single-item`, so
that DVC runs and records the stage exactly as `dvc repro` would). Prefect stays in
flows/pipeline.py; this module is tested without a Prefect server.
"""

from __future__ import annotations

import fcntl
import io
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dvc.exceptions import NotDvcRepoError
from dvc.lock import LockError
from dvc.repo import Repo
from dvc.repo.reproduce import plan_repro
from ruamel.yaml import YAML

from components.atomic import write_file_atomic
from components.config import Config, load_config

# The flow's scratch space, inside DVC's own git-ignored tmp folder.
FLOW_TMP = Path(".dvc") / "tmp" / "dcgan-pipeline"
# params.yaml as it was before a run wrote its overrides in; removed when the run ends.
PARAMS_BASELINE = FLOW_TMP / "params.baseline.yaml"
RUN_LOCK = FLOW_TMP / "run.lock"
PARAMS_FILE = Path("params.yaml")

# DVC's words when another DVC command holds the workspace's lock.
LOCK_MESSAGE = "Unable to acquire lock"
# Failures that another try may not meet, by stage ("*": every stage), matched in the
# stage's error lines: a DVC lock held by a command that is finishing, and ingest's
# network download. Training's own failures are never here: retrying them blindly would
# hide a real fault (a NaN, a bad checkpoint) behind minutes of repeated work.
TRANSIENT_ERRORS: Mapping[str, tuple[str, ...]] = {
    "*": (LOCK_MESSAGE,),
    "ingest": ("ingest: error: cannot reach", "ingest: error: tfds download"),
}
# Native libraries' start-up chatter on stderr (TensorFlow's absl/glog lines ignore
# TF_CPP_MIN_LOG_LEVEL): not the stage's words, so neither warnings nor error text.
_NATIVE_NOISE = re.compile(r"^(WARNING: All log messages before absl::|[IWE]\d{4} \d\d:\d\d:\d\d)")
# How long a stage's process group gets to stop on SIGTERM before SIGKILL.
STOP_GRACE_S = 10.0
# An experiment name DVC and git accept as a ref name (and a shell takes unquoted).
_EXPERIMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class PipelineError(RuntimeError):
    """The run cannot start or go on; the message says why and what to do."""


class StageFailed(PipelineError):
    """A stage exited non-zero; the message carries its own error lines."""

    def __init__(self, stage: str, returncode: int | None, error_lines: list[str]) -> None:
        self.stage, self.returncode, self.error_lines = stage, returncode, list(error_lines)
        text = "\n".join(error_lines) or "(the stage wrote no error output)"
        how = f"dvc repro exited with {returncode}" if returncode is not None else "not started"
        super().__init__(f"stage '{stage}' failed ({how}):\n{text}")


class TransientStageFailure(StageFailed):
    """A failure worth another try: DVC's lock was busy, or a network download failed."""


def stage_failure(stage: str, returncode: int | None, error_lines: list[str]) -> StageFailed:
    """The exception for a failed stage: transient when its error lines say so."""
    markers = (*TRANSIENT_ERRORS["*"], *TRANSIENT_ERRORS.get(stage, ()))
    transient = any(marker in line for line in error_lines for marker in markers)
    return (TransientStageFailure if transient else StageFailed)(stage, returncode, error_lines)


def find_root(start: Path | None = None) -> Path:
    """The DVC repository holding `start` (the working directory by default)."""
    try:
        return Path(Repo.find_root(str(start or Path.cwd())))
    except NotDvcRepoError:
        raise PipelineError(
            f"{start or Path.cwd()} is not inside a DVC repository: run the pipeline from "
            "the project's checkout (where dvc.yaml is)"
        ) from None


def stage_order(root: Path) -> list[str]:
    """Every stage of dvc.yaml in the order `dvc repro` runs them (DVC's own plan)."""
    with Repo(str(root)) as repo:
        return [stage.name for stage in plan_repro(repo.index.graph)]


def why_stale(root: Path, stage: str) -> list[str]:
    """DVC's reasons to run `stage` now, as `dvc status` sees them; [] when up to date."""
    target = f"{root / 'dvc.yaml'}:{stage}"  # not relative to the working directory
    try:
        with Repo(str(root)) as repo:
            status = repo.status(targets=[target])
    except LockError as exc:
        raise TransientStageFailure(stage, None, [f"{LOCK_MESSAGE}: {exc}"]) from None
    # One stage asked, so at most one entry (keyed by a path relative to the cwd).
    return describe_status([entry for entries in status.values() for entry in entries])


def describe_status(entries: list[Any]) -> list[str]:
    """`dvc status` entries of one stage as short lines: 'changed params: train.epochs'."""
    lines = []
    for entry in entries:
        if isinstance(entry, str):  # "changed command", "always changed"
            lines.append(entry)
            continue
        for kind, changes in entry.items():
            if not isinstance(changes, dict):
                lines.append(f"{kind}: {changes}")
                continue
            items = []
            for path, change in changes.items():
                if isinstance(change, dict):  # params: {file: {key: how}}
                    items += [f"{key} ({how})" for key, how in change.items()]
                else:
                    items.append(f"{path} ({change})")
            more = f" and {len(items) - 4} more" if len(items) > 4 else ""
            lines.append(f"{kind}: {', '.join(items[:4])}{more}")
    return lines


def _stage_env() -> dict[str, str]:
    """The stage's environment: this interpreter's `python` and `dvc` first on PATH (the
    stages' commands say `python -m ...`), and unbuffered output so lines arrive live."""
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
    }


def is_native_noise(line: str) -> bool:
    """True for a native library's log line (absl/glog format), not the stage's own."""
    return bool(_NATIVE_NOISE.match(line))


def run_stage(root: Path, stage: str, on_line: Callable[[str, bool], None]) -> None:
    """`dvc repro --single-item STAGE` in `root`: DVC runs the stage (when stale) and
    records it. Each output line goes to `on_line(line, is_stderr)` as it is written;
    the stage's stderr lines, without native libraries' chatter, become the error text
    of a failure.

    The stage runs in its own process group, so that a flow stopped by a signal or an
    exception (Ctrl-C, a cancelled run) stops the whole stage with it rather than leaving
    it running without anyone waiting for it.
    """
    command = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    process = subprocess.Popen(
        command, cwd=root, env=_stage_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, errors="replace", bufsize=1, start_new_session=True,
    )  # fmt: skip
    errors: list[str] = []

    def pump(stream, is_stderr: bool) -> None:
        for raw in stream:
            line = raw.rstrip()
            if line.strip():
                if is_stderr and not is_native_noise(line):
                    errors.append(line)
                on_line(line, is_stderr)

    reader = threading.Thread(target=pump, args=(process.stderr, True), daemon=True)
    reader.start()
    try:
        pump(process.stdout, False)
        returncode = process.wait()
    finally:
        if process.poll() is None:
            _stop_group(process)
        reader.join(timeout=5)
    if returncode:
        raise stage_failure(stage, returncode, errors)


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the stage's process group, SIGKILL after a grace period."""
    for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


# ----------------------------------------------------------------------------- params


def check_overrides(root: Path, overrides: Mapping[str, Any]) -> Config:
    """params.yaml plus `overrides` as the run will see it; ConfigError names a bad key."""
    return load_config(root / PARAMS_FILE, overrides=dict(overrides))


def restore_interrupted_params(root: Path) -> bool:
    """Put back params.yaml as it was before a run that was killed with its overrides in
    place. True when there was one to restore."""
    baseline = root / PARAMS_BASELINE
    if not baseline.exists():
        return False
    write_file_atomic(root / PARAMS_FILE, baseline.read_bytes())
    baseline.unlink()
    return True


@contextmanager
def params_overridden(root: Path, overrides: Mapping[str, Any]) -> Iterator[None]:
    """params.yaml with `overrides` (dotted keys) written in, for DVC and the stages to
    read, then put back as it was: the overrides belong to this run (and its experiment),
    not to the next. Comments and key order are kept (ruamel's round trip), as
    `dvc exp run --set-param` does. A run killed in between leaves the original beside it
    in PARAMS_BASELINE; `restore_interrupted_params` puts it back."""
    if not overrides:
        yield
        return
    params, baseline = root / PARAMS_FILE, root / PARAMS_BASELINE
    original = params.read_bytes()
    baseline.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(baseline, original)
    write_file_atomic(params, _with_overrides(original.decode(), overrides).encode())
    try:
        yield
    finally:
        write_file_atomic(params, original)
        baseline.unlink(missing_ok=True)


def _with_overrides(text: str, overrides: Mapping[str, Any]) -> str:
    yaml = YAML()  # round trip: comments, order and quoting survive
    yaml.preserve_quotes = True
    yaml.representer.add_representer(  # `null` as written, not an empty value
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    data = yaml.load(text)
    for dotted, value in overrides.items():
        *sections, key = dotted.split(".")
        node = data
        for section in sections:
            if section not in node:
                node[section] = {}
            node = node[section]
        node[key] = value
    out = io.StringIO()
    yaml.dump(data, out)
    return out.getvalue()


@contextmanager
def workspace_lock(root: Path, holder: str) -> Iterator[None]:
    """One pipeline run per workspace at a time, whoever started it (`make run`, the
    deployment, a test): they would overwrite each other's params and outputs."""
    path = root / RUN_LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            other = handle.read().strip() or "another process"
            raise PipelineError(
                f"another pipeline run is active in {root} ({other}); wait for it to end, "
                "or stop it, then start this one again"
            ) from None
        handle.truncate(0)
        handle.write(f"{holder}, pid {os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- experiments


def check_experiment_name(root: Path, name: str) -> None:
    """Raise PipelineError unless `name` can be a new experiment's name here."""
    if not _EXPERIMENT_NAME.fullmatch(name) or name.endswith(".lock") or ".." in name:
        raise PipelineError(
            f"experiment {name!r}: use 1-100 letters, digits, '.', '_' or '-', starting "
            "with a letter or digit"
        )
    if name in experiment_names(root):
        raise PipelineError(
            f"experiment {name!r} exists already (dvc exp show); choose another name, or "
            f"remove the old one with: dvc exp remove {name}"
        )


def experiment_names(root: Path) -> set[str]:
    """Names of the experiments saved in this repository (refs/exps/<baseline>/<name>)."""
    listed = subprocess.run(
        ["git", "for-each-ref", "--format=%(refname)", "refs/exps/"],
        cwd=root, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    # refs/exps/ab/cdef.../NAME; refs/exps/exec/... and the like are DVC's own.
    return {ref.split("/")[-1] for ref in listed if len(ref.split("/")) == 5}


@dataclass(frozen=True)
class SavedExperiment:
    name: str
    rev: str  # the git commit DVC made for it (refs/exps/...)
    remote: str | None  # the DVC remote it was pushed to, if any
    pushed_files: int


# Who the experiment's commit is by when git knows no user here (a fresh CI machine, a
# service account): git's own GIT_AUTHOR_*/GIT_COMMITTER_* variables, for this call only.
FALLBACK_IDENTITY = {"NAME": "dcgan-pipeline", "EMAIL": "dcgan-pipeline@localhost"}


@contextmanager
def _git_identity(root: Path) -> Iterator[None]:
    def configured(key: str) -> bool:
        return bool(subprocess.run(["git", "config", key], cwd=root, capture_output=True,
                                   text=True).stdout.strip())  # fmt: skip

    if configured("user.name") and configured("user.email"):
        yield
        return
    added = {
        f"GIT_{role}_{part}": value
        for role in ("AUTHOR", "COMMITTER")
        for part, value in FALLBACK_IDENTITY.items()
        if f"GIT_{role}_{part}" not in os.environ
    }
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def save_experiment(root: Path, name: str, message: str) -> SavedExperiment:
    """Record the workspace (params, metrics, dvc.lock: every output's hash) as experiment
    `name`, then push its outputs to the default DVC remote when one is configured."""
    try:
        with _git_identity(root), Repo(str(root)) as repo:
            rev = repo.experiments.save(name=name, message=message)
            remote = repo.config["core"].get("remote")
            pushed = repo.push() if remote else 0
            url = repo.config["remote"][remote].get("url") if remote else None
    except LockError as exc:
        raise TransientStageFailure("experiment", None, [f"{LOCK_MESSAGE}: {exc}"]) from None
    return SavedExperiment(name, str(rev), f"{remote} ({url})" if remote else None, pushed)
