"""What a flow run shows in the Prefect UI: its artifacts, built from the files the stages
wrote. Each has a fixed key, so that the UI lines up the same artifact across runs
(Artifacts page: one history per key).

The builders are plain functions from the stages' JSON to markdown or table rows (tested
without a server); `publish_*` hand them to Prefect inside a running flow.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

VALIDATION_KEY = "validation-summary"
METRICS_KEY = "sample-metrics"
SAMPLES_KEY = "sample-grid"
EXPERIMENT_KEY = "experiment"
PROGRESS_KEY = "training-progress"

SUMMARY_JSON = Path("reports/validation/summary.json")
VALIDATION_INDEX = Path("reports/validation/index.html")
METRICS_JSON = Path("reports/metrics.json")
CLASSIFIER_JSON = Path("reports/classifier.json")
SAMPLE_IMAGES = (Path("samples/grid.png"), Path("samples/interpolation.png"))

# reports/metrics.json's figures in the order a reader wants them, with which way is
# better; KID and the Inception Score are {mean, std}.
METRIC_ROWS: tuple[tuple[str, str, str], ...] = (
    ("fid", "FID", "lower"),
    ("kid", "KID", "lower"),
    ("inception_score", "Inception Score (classifier)", "higher"),
    ("precision", "precision", "higher"),
    ("recall", "recall", "higher"),
    ("density", "density", "higher"),
    ("coverage", "coverage", "higher"),
    ("class_entropy_normalized", "class entropy / maximum", "higher"),
    ("smallest_class_share", "smallest class share", "higher (0.1 = even)"),
    ("classes_present", "classes present", "higher (10)"),
)


def _figure(value: Any) -> str:
    if isinstance(value, Mapping):  # {mean, std}
        return f"{value['mean']:.4g} ± {value['std']:.2g}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def metrics_table(metrics: Mapping[str, Any]) -> list[dict[str, str]]:
    """One row per figure: the samples' value beside the real-data floor."""
    floor = metrics.get("floor", {})
    return [
        {
            "metric": label,
            "samples": _figure(metrics[key]),
            "real-data floor": _figure(floor[key]) if key in floor else "",
            "better": better,
        }
        for key, label, better in METRIC_ROWS
        if key in metrics
    ]


def validation_markdown(summary: Mapping[str, Any]) -> str:
    """The gate's outcome: counts per split, and every failed expectation when it failed."""
    evaluated, failed = summary["checks_evaluated"], summary["checks_failed"]
    if summary["passed"]:
        head = f"## Validation passed: {evaluated} of {evaluated} checks"
    else:
        head = f"## Validation FAILED: {failed} of {evaluated} checks failed; no training"
    lines = [
        head,
        "",
        f"Dataset `{summary['dataset']}` (fingerprint `{summary['dataset_fingerprint'][:12]}`)",
        "",
        "| split | examples | expected | per class (min-max) | duplicates | "
        "also in train | pixel mean | pixel std |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for split, counts in summary["counts"].items():
        profile = summary.get("profile", {}).get(split, {})
        per_class = counts.get("per_class") or [0]
        lines.append(
            f"| {split} | {counts['examples']} | {counts['expected']} | "
            f"{min(per_class)}-{max(per_class)} | {counts['duplicate_images']} | "
            f"{counts.get('also_in_train', '')} | {profile.get('pixel_mean', '')} | "
            f"{profile.get('pixel_std', '')} |"
        )
    if summary["failed"]:
        lines += ["", "### Failed expectations", "", "| table | check | observed | expected |",
                  "| --- | --- | --- | --- |"]  # fmt: skip
        lines += [
            f"| {f['table']} | {f['check']} | {_cell(f['observed'])} | {_cell(f['expected'])} |"
            for f in summary["failed"]
        ]
    lines += ["", f"Full report: `{VALIDATION_INDEX}` (opens from disk)."]
    return "\n".join(lines)


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def samples_markdown(images: Mapping[str, bytes], caption: str) -> str:
    """PNG images inline (data URIs: Prefect's image artifact only takes a URL)."""
    parts = [f"## {caption}", ""]
    for name, png in images.items():
        encoded = base64.b64encode(png).decode("ascii")
        parts += [f"**{name}**", "", f"![{name}](data:image/png;base64,{encoded})", ""]
    return "\n".join(parts)


def experiment_markdown(name: str, flow_run: str, rev: str, remote: str | None) -> str:
    """The run's experiment, and the commands that compare it with another run or bring
    its samples and model back."""
    pushed = f"pushed to the DVC remote {remote}" if remote else "not pushed (no DVC remote)"
    return f"""## Experiment `{name}`

Flow run `{flow_run}` is saved as DVC experiment `{name}` (commit `{rev[:12]}`; {pushed}).

List the runs with their params and metrics:

```bash
dvc exp show
```

Compare this run with another (`OTHER`: an experiment name, a branch or a commit):

```bash
dvc metrics diff OTHER {name}        # FID, KID, precision, recall, ... side by side
dvc params diff OTHER {name}         # what was set differently
dvc plots diff OTHER {name} --open   # sample grids, interpolations, progress, loss curves
```

Bring this run's params, samples and model back into the workspace:

```bash
dvc exp apply {name} && dvc checkout     # dvc pull first where the cache lacks them
```
"""


def read_json(path: Path) -> dict[str, Any] | None:
    """A stage's JSON output, or None when the stage has not written it."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# ----------------------------------------------------------------------------- publishing


def publish_validation(root: Path) -> None:
    summary = read_json(root / SUMMARY_JSON)
    if summary is None:
        return
    status = "passed" if summary["passed"] else "FAILED"
    create_markdown_artifact(
        validation_markdown(summary), key=VALIDATION_KEY, description=f"Validation {status}"
    )


def publish_metrics(root: Path) -> None:
    metrics = read_json(root / METRICS_JSON)
    if metrics is None:
        return
    accuracy = (read_json(root / CLASSIFIER_JSON) or {}).get("test_accuracy")
    network = metrics.get("setup", {}).get("feature_network", "")
    description = f"Samples against the real-data floor; features: {network}"
    if accuracy is not None:
        description += f" (test accuracy {accuracy:.2%})"
    create_table_artifact(metrics_table(metrics), key=METRICS_KEY, description=description)


def publish_samples(root: Path) -> None:
    images = {p.name: (root / p).read_bytes() for p in SAMPLE_IMAGES if (root / p).exists()}
    if not images:
        return
    create_markdown_artifact(
        samples_markdown(images, "Samples of the trained generator"),
        key=SAMPLES_KEY,
        description="samples/grid.png (training's fixed latent batch) and interpolation.png",
    )


# Stage -> what to publish once it has run (or been found up to date).
PUBLISHERS = {"validate": publish_validation, "generate": publish_samples,
              "evaluate": publish_metrics}  # fmt: skip


def publish_experiment(name: str, flow_run: str, rev: str, remote: str | None) -> None:
    create_markdown_artifact(
        experiment_markdown(name, flow_run, rev, remote),
        key=EXPERIMENT_KEY,
        description=f"DVC experiment {name}: compare and restore commands",
    )


class TrainingProgress:
    """The train stage's log lines turned into a progress artifact, updated as epochs (and
    the progress lines within an epoch) arrive."""

    _EPOCH = re.compile(r"^train: epoch (\d+)/(\d+)\s")
    _STEP = re.compile(r"^train: epoch (\d+) step (\d+)/(\d+)\s")
    _RESUMED = re.compile(r"^train: resuming from epoch (\d+)")
    _NOTHING_TO_DO = "train: nothing to train"

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs
        self._artifact_id = None

    def percent_after(self, line: str) -> float | None:
        """The percentage done that `line` tells, or None when it tells none."""
        if match := self._EPOCH.match(line):
            return 100.0 * int(match[1]) / int(match[2])
        if match := self._STEP.match(line):
            epoch, step, steps = (int(g) for g in match.groups())
            return 100.0 * (epoch - 1 + step / steps) / self.epochs
        if match := self._RESUMED.match(line):
            return 100.0 * int(match[1]) / self.epochs
        if line.startswith(self._NOTHING_TO_DO):
            return 100.0
        return None

    def start(self, description: str, percent: float = 0.0) -> None:
        self._artifact_id = create_progress_artifact(
            percent, key=PROGRESS_KEY, description=description
        )

    def feed(self, line: str) -> None:
        percent = self.percent_after(line)
        if percent is not None and self._artifact_id is not None:
            update_progress_artifact(self._artifact_id, min(100.0, percent))

    def finish(self, description: str) -> None:
        if self._artifact_id is not None:
            update_progress_artifact(self._artifact_id, 100.0, description=description)
