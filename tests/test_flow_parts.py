"""The flow's own logic without a Prefect server: DVC's stage order, status lines, failure
classification and retry policy, params overrides and their restoration, the workspace
lock, experiment names, the artifacts' content, training progress, the command lines."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import ConcurrencyLimitStrategy
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Completed, Failed

from components.config import ConfigError, ScheduleConfig
from components.train import _epoch_line
from flows import artifacts, pipeline, serve, workspace
from tests.conftest import GIT, REPO_ROOT


def init_repo(root: Path, dvc_yaml: dict) -> Path:
    """A git + DVC repository holding only `dvc_yaml` (no stage is ever run)."""
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    (root / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    return root


def test_stage_order_is_dvcs_plan_of_the_dag_not_the_file_order(tmp_path: Path):
    # Written downstream first: the order must come from the deps, not from the file.
    stages = {
        "report": {"cmd": "cat b > r", "deps": ["b"], "outs": ["r"]},
        "middle": {"cmd": "cat a > b", "deps": ["a"], "outs": ["b"]},
        "first": {"cmd": "echo 1 > a", "outs": ["a"]},
    }
    root = init_repo(tmp_path / "repo", {"stages": stages})
    assert workspace.stage_order(root) == ["first", "middle", "report"]


def test_stage_order_of_this_project_respects_every_dependency():
    order = workspace.stage_order(REPO_ROOT)
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    assert sorted(order) == sorted(stages)
    producer = {}
    for name, stage in stages.items():
        for out in stage.get("outs", []) + stage.get("metrics", []):
            producer[out if isinstance(out, str) else next(iter(out))] = name
    for name, stage in stages.items():
        for dep in stage.get("deps", []):
            upstream = next((p for out, p in producer.items() if dep.startswith(out)), None)
            if upstream:
                assert order.index(upstream) < order.index(name), (upstream, name)


def test_why_stale_asks_dvc_and_says_why(tmp_path: Path):
    stages = {"first": {"cmd": "echo 1 > a", "outs": ["a"]}}
    root = init_repo(tmp_path / "repo", {"stages": stages})
    reasons = workspace.why_stale(root, "first")
    assert reasons and "a" in " ".join(reasons)  # never run: its output is missing


def test_describe_status_turns_dvc_entries_into_lines():
    entries = [
        {"changed deps": {"params.yaml": {"train.epochs": "modified"},
                          "components/x.py": "modified"}},
        {"changed outs": {f"out{i}": "deleted" for i in range(6)}},
        "always changed",
    ]  # fmt: skip
    assert workspace.describe_status(entries) == [
        "changed deps: train.epochs (modified), components/x.py (modified)",
        "changed outs: out0 (deleted), out1 (deleted), out2 (deleted), out3 (deleted) and 2 more",
        "always changed",
    ]
    assert workspace.describe_status([]) == []


@pytest.mark.parametrize(
    ("stage", "line", "transient"),
    [
        ("train", "ERROR: Unable to acquire lock. Most likely another DVC process is", True),
        ("evaluate", "ERROR: Unable to acquire lock.", True),
        ("ingest", "ingest: error: cannot reach storage.googleapis.com to download", True),
        ("ingest", "ingest: error: tfds download of fashion_mnist from https://x failed", True),
        ("ingest", "ingest: error: /mirror/train-labels-idx1-ubyte.gz: truncated gzip", False),
        ("train", "train: epoch 2, step 1: non-finite loss (generator nan)", False),
        ("train", "train: error: cannot reach the moon", False),  # ingest's network, not train's
        ("validate", "validate: FAILED train_examples: labels_in_range", False),
    ],
)  # fmt: skip
def test_only_lock_and_network_failures_are_transient(stage, line, transient):
    failure = workspace.stage_failure(stage, 1, ["noise", line])
    assert isinstance(failure, workspace.StageFailed)
    assert isinstance(failure, workspace.TransientStageFailure) is transient
    assert line in str(failure)
    assert f"stage '{stage}' failed (dvc repro exited with 1)" in str(failure)


def test_retry_condition_retries_transient_failures_only():
    lock = workspace.TransientStageFailure("train", 1, ["Unable to acquire lock"])
    nan = workspace.StageFailed("train", 1, ["train: non-finite loss"])
    assert pipeline.only_transient(None, None, Failed(data=lock)) is True
    assert pipeline.only_transient(None, None, Failed(data=nan)) is False
    assert pipeline.only_transient(None, None, Completed()) is False


def test_tasks_never_use_prefects_cache_and_retry_only_by_condition():
    for task_ in (pipeline.run_dvc_stage, pipeline.save_run_as_experiment):
        assert task_.cache_policy is NO_CACHE
        assert task_.persist_result is False
        assert task_.retries == pipeline.RETRIES > 0
        assert task_.retry_condition_fn is pipeline.only_transient
    assert pipeline.dcgan_pipeline.name == "dcgan-pipeline"
    assert set(pipeline.dcgan_pipeline.parameters.properties) == {"overrides", "experiment"}


def test_native_library_chatter_is_not_error_text():
    assert workspace.is_native_noise("I0000 00:00:1796441245.500544   10446 cudart_stub.cc:31] x")
    assert workspace.is_native_noise("WARNING: All log messages before absl::InitializeLog() ...")
    assert workspace.is_native_noise("E0000 00:00:1796441267.289256 cuda_platform.cc:52] failed")
    assert not workspace.is_native_noise("train: error: the data failed validation")
    assert not workspace.is_native_noise("ERROR: failed to reproduce 'train'")


# ----------------------------------------------------------------------------- params


@pytest.fixture
def params_root(tmp_path: Path) -> Path:
    (tmp_path / "params.yaml").write_bytes((REPO_ROOT / "params.yaml").read_bytes())
    return tmp_path


def test_overrides_are_written_for_the_run_and_put_back_after(params_root: Path):
    params = params_root / "params.yaml"
    original = params.read_bytes()
    with workspace.params_overridden(params_root, {"train.epochs": 2, "data.limit": None}):
        text = params.read_text()
        loaded = yaml.safe_load(text)
        assert loaded["train"]["epochs"] == 2 and loaded["data"]["limit"] is None
        # Only the overridden line changes: comments, order and the rest survive.
        changed = set(text.splitlines()) ^ set(original.decode().splitlines())
        assert len(changed) == 2 and all(line.startswith("  epochs: ") for line in changed)
        assert any(line.startswith("  epochs: 2 ") and "# 1..10000" in line for line in changed)
        assert (params_root / workspace.PARAMS_BASELINE).read_bytes() == original
    assert params.read_bytes() == original
    assert not (params_root / workspace.PARAMS_BASELINE).exists()


def test_overrides_are_put_back_when_the_run_fails(params_root: Path):
    original = (params_root / "params.yaml").read_bytes()
    with pytest.raises(RuntimeError), workspace.params_overridden(params_root, {"seed": 1}):
        raise RuntimeError("a stage failed")
    assert (params_root / "params.yaml").read_bytes() == original


def test_params_left_by_a_killed_run_are_restored_by_the_next(params_root: Path):
    original = (params_root / "params.yaml").read_bytes()
    killed = workspace.params_overridden(params_root, {"seed": 7})
    killed.__enter__()  # ... and the process dies: no __exit__
    assert yaml.safe_load((params_root / "params.yaml").read_text())["seed"] == 7
    assert workspace.restore_interrupted_params(params_root) is True
    assert (params_root / "params.yaml").read_bytes() == original
    assert workspace.restore_interrupted_params(params_root) is False


def test_no_overrides_leave_params_untouched(params_root: Path):
    before = (params_root / "params.yaml").stat().st_mtime_ns
    with workspace.params_overridden(params_root, {}):
        pass
    assert (params_root / "params.yaml").stat().st_mtime_ns == before


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"train.epochs": 0}, "train.epochs"),
        ({"train.epochs": "five"}, "train.epochs"),
        ({"trian.epochs": 1}, "trian: unknown key"),
        ({"train.epoch": 1}, "train.epoch: unknown key"),
        ({"seed.x": 1}, "seed is a value, not a section"),
        ({"schedule.cron": "every night"}, "schedule.cron: expected five cron fields"),
        ({"schedule.timezone": "Mars/Base"}, "schedule.timezone: not an IANA time zone"),
    ],
)
def test_bad_overrides_are_refused_naming_the_key(params_root: Path, overrides, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        workspace.check_overrides(params_root, overrides)


def test_one_run_per_workspace(tmp_path: Path):
    with (
        workspace.workspace_lock(tmp_path, "flow run first"),
        pytest.raises(workspace.PipelineError, match="flow run first, pid"),
        workspace.workspace_lock(tmp_path, "flow run second"),
    ):
        pass
    with workspace.workspace_lock(tmp_path, "flow run third"):  # free again
        pass


def test_experiment_names_are_checked_before_the_run(tmp_path: Path):
    root = init_repo(tmp_path / "repo", {"stages": {}})
    subprocess.run([*GIT, "commit", "-q", "--allow-empty", "-m", "base"], cwd=root, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip
    ref = f"refs/exps/{head[:2]}/{head[2:]}/taken"
    subprocess.run(["git", "update-ref", ref, head], cwd=root, check=True)
    assert workspace.experiment_names(root) == {"taken"}
    workspace.check_experiment_name(root, "nightly-2026-12-05.v2")
    for bad in ("bad name", "-dash", "a..b", "x.lock", "", "a" * 101, "semi;colon"):
        with pytest.raises(workspace.PipelineError, match="use 1-100 letters"):
            workspace.check_experiment_name(root, bad)
    with pytest.raises(workspace.PipelineError, match="exists already.*dvc exp remove taken"):
        workspace.check_experiment_name(root, "taken")


def test_default_experiment_name_names_the_flow_run():
    name = pipeline.default_experiment_name("cheerful-otter", "3fa85f64-5717-4562-b3fc")
    assert name == "cheerful-otter-3fa85f64"


# ----------------------------------------------------------------------------- artifacts

METRICS = {
    "fid": 49.73, "kid": {"mean": 1.8786, "std": 0.196},
    "inception_score": {"mean": 4.87, "std": 0.08},
    "precision": 0.72, "recall": 0.313, "density": 0.598, "coverage": 0.192,
    "class_entropy_normalized": 0.99, "smallest_class_share": 0.0605, "classes_present": 10,
    "floor": {"fid": 0.224, "kid": {"mean": -0.006, "std": 0.039},
              "inception_score": {"mean": 8.61, "std": 0.1}, "precision": 0.916,
              "recall": 0.92, "density": 1.009, "coverage": 0.969,
              "class_entropy_normalized": 1.0, "smallest_class_share": 0.0962,
              "classes_present": 10},
}  # fmt: skip


def test_metrics_table_puts_each_figure_beside_its_floor():
    rows = artifacts.metrics_table(METRICS)
    by_metric = {row["metric"]: row for row in rows}
    assert by_metric["FID"] == {"metric": "FID", "samples": "49.73", "real-data floor": "0.224",
                                "better": "lower"}  # fmt: skip
    assert by_metric["KID"]["samples"] == "1.879 ± 0.2"
    assert by_metric["KID"]["real-data floor"] == "-0.006 ± 0.039"
    assert by_metric["classes present"]["samples"] == "10"
    assert len(rows) == len(artifacts.METRIC_ROWS)


SUMMARY = {
    "passed": False, "dataset": "data/fashion_mnist/3.0.1", "dataset_fingerprint": "ab" * 32,
    "checks_evaluated": 27, "checks_failed": 2,
    "counts": {"train": {"examples": 300, "expected": 60000, "duplicate_images": 0,
                         "per_class": [30] * 10},
               "test": {"examples": 100, "expected": 10000, "duplicate_images": 0,
                        "per_class": [10] * 10, "also_in_train": 0}},
    "profile": {"train": {"pixel_mean": 72.1, "pixel_std": 89.0}},
    "failed": [{"table": "train_examples", "check": "labels_in_range", "passed": False,
                "observed": "1 of 300 rows fail, e.g. {index: 3, label: 10}",
                "expected": "every label in 0..9"},
               {"table": "train_examples", "check": "row_count", "passed": False,
                "observed": "300", "expected": "60000 rows"}],
}  # fmt: skip


def test_validation_markdown_lists_every_failed_expectation():
    text = artifacts.validation_markdown(SUMMARY)
    assert text.startswith("## Validation FAILED: 2 of 27 checks failed; no training")
    failed_row = (
        "| train_examples | labels_in_range | 1 of 300 rows fail, e.g. {index: 3, label: 10} |"
    )
    assert failed_row in text
    assert "| train_examples | row_count | 300 | 60000 rows |" in text
    assert "| train | 300 | 60000 | 30-30 | 0 |" in text
    passed = artifacts.validation_markdown({**SUMMARY, "passed": True, "failed": [],
                                            "checks_failed": 0})  # fmt: skip
    assert passed.startswith("## Validation passed: 27 of 27 checks")
    assert "Failed expectations" not in passed


def test_samples_markdown_carries_the_png_inline():
    png = bytes(range(256))  # any bytes: they must come back exactly
    text = artifacts.samples_markdown({"grid.png": png}, "Samples")
    encoded = text.split("data:image/png;base64,")[1].split(")")[0]
    assert base64.b64decode(encoded) == png


def test_experiment_markdown_gives_the_compare_and_restore_commands():
    text = artifacts.experiment_markdown("night-1", "cheerful-otter", "f" * 40, "local-store (/r)")
    assert "Flow run `cheerful-otter` is saved as DVC experiment `night-1`" in text
    assert "dvc exp show" in text
    assert "dvc metrics diff OTHER night-1" in text
    assert "dvc plots diff OTHER night-1 --open" in text
    assert "dvc exp apply night-1 && dvc checkout" in text
    assert "pushed to the DVC remote local-store (/r)" in text
    assert "not pushed" in artifacts.experiment_markdown("n", "r", "f" * 40, None)


def test_training_progress_follows_the_train_stages_own_lines():
    progress = artifacts.TrainingProgress(epochs=4)
    record = {"epoch": 1, "g_loss": 0.8, "d_loss": 1.2, "d_real": 0.5, "d_fake": 0.4,
              "images_per_sec": 700.0, "epoch_seconds": 85.0}  # fmt: skip
    assert progress.percent_after(f"train: {_epoch_line(record, 4)}") == 25.0
    assert progress.percent_after(
        "train: epoch 2 step 468/937  g_loss 0.800  d_loss 1.200  700 img/s"
    ) == pytest.approx(100 * (1 + 468 / 937) / 4)
    assert progress.percent_after("train: resuming from epoch 3 (models/checkpoints/ckpt-3)") == 75
    assert progress.percent_after("train: nothing to train, the checkpoint is at epoch 4") == 100
    assert progress.percent_after("train: checkpoint models/checkpoints/ckpt-1") is None
    assert progress.percent_after("generate: epoch 1/4") is None


# ----------------------------------------------------------------------------- command lines


def test_set_options_are_read_as_yaml_values():
    assert pipeline.parse_set_options(["train.epochs=1", "data.limit=null", "x.y=0.5",
                                       "a.b=text", "c.d=true"]) == {
        "train.epochs": 1, "data.limit": None, "x.y": 0.5, "a.b": "text", "c.d": True,
    }  # fmt: skip
    for bad in ("train.epochs", "=1", "k=[unclosed"):
        with pytest.raises(ValueError, match="--set"):
            pipeline.parse_set_options([bad])


def test_pipeline_command_refuses_bad_input_before_prefect_starts(monkeypatch, capsys):
    monkeypatch.chdir(REPO_ROOT)
    assert pipeline.main(["--set", "train.epochs=0"]) == 2
    assert "train.epochs: Input should be greater than or equal to 1" in capsys.readouterr().err
    assert pipeline.main(["--set", "train.epohcs=3"]) == 2
    assert "train.epohcs: unknown key" in capsys.readouterr().err
    assert pipeline.main(["--experiment", "has space"]) == 2
    assert "experiment 'has space'" in capsys.readouterr().err


def test_outside_a_dvc_repository_the_command_says_where_to_run(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert pipeline.main([]) == 2
    assert "not inside a DVC repository" in capsys.readouterr().err


def test_deployment_concurrency_follows_the_schedule_config():
    assert serve.concurrency(ScheduleConfig()).limit == 1
    assert serve.concurrency(ScheduleConfig()).collision_strategy == (
        ConcurrencyLimitStrategy.CANCEL_NEW
    )
    enqueue = serve.concurrency(ScheduleConfig(on_collision="enqueue"))
    assert enqueue.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE


def test_serve_needs_a_real_server(monkeypatch, capsys):
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert serve.main([]) == 2
    assert "PREFECT_API_URL is not set: start the server with `make ui`" in capsys.readouterr().err
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing listens on 9
    assert serve.main([]) == 2
    assert "no Prefect server answers at http://127.0.0.1:9/api" in capsys.readouterr().err


def test_the_command_line_uses_the_local_server_only_when_one_answers(monkeypatch):
    """`make run` records its run on `make ui`'s server when that is up and no other API is
    configured; else Prefect's temporary server (None here)."""
    import http.server
    import threading

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the stdlib's name)
            self.send_response(200 if self.path == "/api/health" else 404)
            self.end_headers()
            self.wfile.write(b"true")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    api = f"http://127.0.0.1:{server.server_address[1]}/api"
    try:
        with temporary_settings(restore_defaults={PREFECT_API_URL}):
            assert pipeline.running_local_server(api) == api
            assert pipeline.running_local_server("http://127.0.0.1:9/api") is None
        with temporary_settings({PREFECT_API_URL: "http://elsewhere:4200/api"}):
            assert pipeline.running_local_server(api) is None  # a configured API wins
    finally:
        server.shutdown()
