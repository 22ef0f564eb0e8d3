"""Stage `validate`: the gate between data and training, with Great Expectations.

Reads `data/fashion_mnist/` through tensorflow-datasets, builds one table per split with a
row of statistics per example (`components.example_stats`), derives a per-class table per
split and a pixel profile of each split, and checks them all with the suites defined in
`components.expectations`. Writes `reports/validation/`:

- `summary.json`: passed or not, counts, every check's outcome, the failures;
- `results.json`: Great Expectations' validation results;
- `data_docs/`: Great Expectations' Data Docs site;
- `index.html`: a self-contained page (no network needed) with the outcome of each check
  and links to the Data Docs pages.

The stage exits 1 when any check fails, printing each failure on one line. It only reads
the data; the report folder is replaced as a whole, only once the new report is complete.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.atomic import recover_interrupted, replace_dir, scratch_beside
from components.cli import setup_logging, stage_parser
from components.config import ConfigError, DataConfig, ValidateConfig, load_config
from components.example_stats import SPLITS, DatasetError, read_example_stats, require_prepared
from components.idx import FASHION_MNIST
from components.ingest import CLASS_NAMES, DEFAULT_OUT_DIR, TFDS_VERSION

log = logging.getLogger("validate")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATASET_DIR = DEFAULT_OUT_DIR / TFDS_VERSION
DEFAULT_REPORT_DIR = Path("reports/validation")
SUMMARY_FILE = "summary.json"
RESULTS_FILE = "results.json"
DOCS_DIR = "data_docs"
INDEX_FILE = "index.html"


@dataclass(frozen=True)
class ValidationReport:
    passed: bool
    summary: dict[str, Any]  # what summary.json holds
    failure_lines: tuple[str, ...]
    out_dir: Path
    seconds: float


def expected_rows(data: DataConfig) -> dict[str, int]:
    """Examples each split must hold: `data.limit` (or all) for train, all for test."""
    return {
        "train": data.limit or FASHION_MNIST.train.images.count,
        "test": FASHION_MNIST.test.images.count,
    }


def dataset_fingerprint(dataset_dir: Path) -> str:
    """SHA-256 over every file of the dataset folder (names and bytes), in a fixed order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in dataset_dir.rglob("*") if p.is_file()):
        digest.update(path.relative_to(dataset_dir).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


class UnvalidatedDataError(RuntimeError):
    """A stage was asked to use data that has not passed validation (or has changed since)."""


DEFAULT_SUMMARY = DEFAULT_REPORT_DIR / SUMMARY_FILE


def require_validated(summary_path: Path, dataset_dir: Path) -> str:
    """The dataset's fingerprint, once validate's summary says that this dataset passed.

    Every stage that reads `data/` calls this first: no model is trained or judged on data
    that failed the gate, or that changed after it passed.
    """
    if not summary_path.is_file():
        raise UnvalidatedDataError(
            f"{summary_path} is missing: the data has not been validated; "
            "run `dvc repro validate` (or `python -m components.validate`) first"
        )
    summary = json.loads(summary_path.read_text())
    if summary.get("passed") is not True:
        failed = ", ".join(f"{f['table']}: {f['check']}" for f in summary.get("failed", []))
        raise UnvalidatedDataError(
            f"{summary_path}: the data failed validation ({failed or 'see the report'}); "
            "no stage uses it. Fix the data, then re-run validate"
        )
    if not dataset_dir.is_dir():
        raise UnvalidatedDataError(f"{dataset_dir}: no dataset; run `dvc repro ingest` first")
    if summary.get("dataset_fingerprint") != dataset_fingerprint(dataset_dir):
        raise UnvalidatedDataError(
            f"{dataset_dir} changed after it was validated ({summary_path} describes "
            "another dataset); run `dvc repro validate` again"
        )
    return summary["dataset_fingerprint"]


def class_table(examples: pd.DataFrame) -> pd.DataFrame:
    """Per class 0..9: its name, how many examples of the split hold it, and their share."""
    counts = examples["label"].value_counts().reindex(range(len(CLASS_NAMES)), fill_value=0)
    return pd.DataFrame(
        {
            "label": np.arange(len(CLASS_NAMES), dtype=np.int64),
            "name": list(CLASS_NAMES),
            "examples": counts.to_numpy(dtype=np.int64),
            "share": counts.to_numpy(dtype=np.float64) / max(len(examples), 1),
        }
    )


def pixel_profile(examples: pd.DataFrame) -> tuple[float, float]:
    """Mean and std over all pixels of a split, from the per-image means and stds.

    Pooled exactly: each image weighs by its pixel count; the variance is the mean of the
    per-image second moments (std^2 + mean^2) minus the square of the overall mean.
    """
    if examples.empty:
        return float("nan"), float("nan")
    pixels = (examples["height"] * examples["width"] * examples["channels"]).to_numpy(float)
    means, stds = examples["mean"].to_numpy(float), examples["std"].to_numpy(float)
    mean = float(np.average(means, weights=pixels))
    second_moment = float(np.average(stds**2 + means**2, weights=pixels))
    return mean, float(np.sqrt(max(second_moment - mean**2, 0.0)))


def profile_table(tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    rows = []
    for split, examples in tables.items():
        mean, std = pixel_profile(examples)
        rows.append(
            {"split": split, "examples": len(examples), "pixel_mean": mean, "pixel_std": std}
        )
    return pd.DataFrame(rows)


def mark_test_in_train(tables: Mapping[str, pd.DataFrame]) -> None:
    """Add `in_train` to the test table: does the same image also appear in train?"""
    tables["test"]["in_train"] = tables["test"]["hash"].isin(set(tables["train"]["hash"]))


def _load_gx():
    from components import expectations  # Great Expectations: ~8 s of imports

    return expectations


def _read_while_loading_gx(dataset_dir: Path, scratch: Path):
    """Read the statistics in a child process while this one imports Great Expectations.

    Each costs seconds of CPU (TensorFlow's import plus decoding 70k images; GX's import
    alone is ~8 s). Side by side on two cores they take a third off the stage's time. A
    plain subprocess rather than multiprocessing: it needs no `__main__` guard from
    whoever calls this, and starts without this process's threads.
    """
    out = scratch / "example_stats.pkl"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    child = subprocess.Popen(
        [sys.executable, "-m", "components.example_stats", str(dataset_dir), str(out)], env=env
    )
    try:
        expectations = _load_gx()
    finally:
        returncode = child.wait()
    if returncode != 0 or not out.is_file():
        raise DatasetError(f"{dataset_dir}: reading the examples failed (exit {returncode})")
    payload = pickle.loads(out.read_bytes())
    if "error" in payload:
        raise DatasetError(payload["error"])
    return expectations, payload["tables"]


@dataclass(frozen=True)
class _Tables:
    """Everything checked: per-example tables, per-class tables (by split), the profile."""

    examples: Mapping[str, pd.DataFrame]
    classes: Mapping[str, pd.DataFrame]
    profile: pd.DataFrame


def _derive(examples: Mapping[str, pd.DataFrame]) -> _Tables:
    mark_test_in_train(examples)
    classes = {split: class_table(table) for split, table in examples.items()}
    return _Tables(examples, classes, profile_table(examples))


def _checked_tables(expectations, tables: _Tables, cfg: ValidateConfig, expected):
    checked = [
        expectations.CheckedTable(
            name=f"{split}_examples",
            frame=tables.examples[split],
            checks=expectations.example_checks(
                split, expected[split], cfg, against_train=split == "test"
            ),
            id_columns=("index", "label"),
        )
        for split in SPLITS
    ]
    checked += [
        expectations.CheckedTable(
            name=f"{split}_classes",
            frame=tables.classes[split],
            checks=expectations.class_checks(split, len(tables.examples[split]), cfg),
            id_columns=("label", "name"),
        )
        for split in SPLITS
    ]
    checked.append(
        expectations.CheckedTable(
            name="profile",
            frame=tables.profile,
            checks=expectations.profile_checks(cfg),
            id_columns=("split",),
        )
    )
    return checked


def _counts(tables: _Tables, expected: Mapping[str, int]) -> dict:
    counts = {}
    for split, examples in tables.examples.items():
        counts[split] = {
            "examples": len(examples),
            "expected": expected[split],
            "duplicate_images": int(examples["hash"].duplicated().sum()),
            "per_class": tables.classes[split]["examples"].tolist(),
        }
    counts["test"]["also_in_train"] = int(tables.examples["test"]["in_train"].sum())
    return counts


def _index_html(summary: Mapping[str, Any]) -> str:
    """A small report page that needs no network (GX's own pages load CSS/JS from CDNs)."""
    status = "passed" if summary["passed"] else "FAILED"
    rows = "\n".join(
        "<tr class='{cls}'><td><a href='{page}'>{table}</a></td><td>{check}</td>"
        "<td>{result}</td><td>{observed}</td><td>{expected}</td></tr>".format(
            cls="ok" if c["passed"] else "bad",
            page=html.escape(f"{DOCS_DIR}/{summary['report']['pages'][c['table']]}"),
            table=html.escape(c["table"]),
            check=html.escape(c["check"]),
            result="pass" if c["passed"] else "FAIL",
            observed=html.escape(c["observed"]),
            expected=html.escape(c["expected"]),
        )
        for c in summary["checks"]
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Validation: {status}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; }}
.ok td:nth-child(3) {{ color: #176117; }} .bad {{ background: #fde8e8; }}
.bad td:nth-child(3) {{ color: #a00; font-weight: bold; }}
</style></head><body>
<h1>Fashion-MNIST validation: {status}</h1>
<p>{summary["checks_failed"]} of {summary["checks_evaluated"]} checks failed.
Dataset <code>{html.escape(summary["dataset"])}</code>,
fingerprint <code>{summary["dataset_fingerprint"][:16]}</code>.</p>
<p>Great Expectations: <a href="{DOCS_DIR}/index.html">Data Docs</a> (its pages load their
styles from the web) &middot; <a href="{RESULTS_FILE}">results.json</a> &middot;
<a href="{SUMMARY_FILE}">summary.json</a></p>
<table><tr><th>table</th><th>check</th><th>result</th><th>observed</th><th>expected</th></tr>
{rows}
</table></body></html>
"""


def run_validate(
    cfg: ValidateConfig,
    expected: Mapping[str, int],
    dataset_dir: Path = DEFAULT_DATASET_DIR,
    out_dir: Path = DEFAULT_REPORT_DIR,
    in_child: bool = False,
) -> ValidationReport:
    """Check the dataset in `dataset_dir` and write the report to `out_dir`.

    Bad data does not raise (the report says what failed); only a dataset that cannot be
    read does. `in_child` reads the data in a child process while this one loads Great
    Expectations: faster for a fresh process (the CLI), slower where TensorFlow and GX
    are loaded already (a test session).
    """
    started = time.perf_counter()
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    require_prepared(dataset_dir)
    recover_interrupted(out_dir)
    fingerprint = dataset_fingerprint(dataset_dir)
    with scratch_beside(out_dir) as scratch:
        if in_child:
            expectations, examples = _read_while_loading_gx(dataset_dir, scratch)
        else:
            examples, expectations = read_example_stats(dataset_dir), _load_gx()
        tables = _derive(examples)
        log.info(
            "read %s; checking them with Great Expectations",
            ", ".join(f"{len(t)} {split}" for split, t in examples.items()),
        )
        report_dir = scratch / "report"
        run = expectations.run_checks(
            _checked_tables(expectations, tables, cfg, expected),
            report_dir / DOCS_DIR,
            run_name=f"fashion_mnist-{fingerprint[:12]}",
        )
        checks = [vars(outcome) for outcome in run.outcomes]
        failed = [outcome for outcome in run.outcomes if not outcome.passed]
        summary = {
            "passed": run.passed,
            "dataset": str(dataset_dir),
            "dataset_fingerprint": fingerprint,
            "checks_evaluated": len(checks),
            "checks_failed": len(failed),
            "counts": _counts(tables, expected),
            "profile": tables.profile.set_index("split")[["pixel_mean", "pixel_std"]]
            .round(4)
            .to_dict(orient="index"),
            "failed": [vars(outcome) for outcome in failed],
            "checks": checks,
            "report": {"data_docs": f"{DOCS_DIR}/index.html", "pages": dict(run.pages)},
        }
        (report_dir / RESULTS_FILE).write_text(
            json.dumps({"success": run.passed, "validations": list(run.results)}, indent=1)
        )
        (report_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        (report_dir / INDEX_FILE).write_text(_index_html(summary))
        replace_dir(report_dir, out_dir)

    return ValidationReport(
        passed=run.passed,
        summary=summary,
        failure_lines=tuple(outcome.line() for outcome in failed),
        out_dir=out_dir,
        seconds=time.perf_counter() - started,
    )


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(
        "validate", "Validate the ingested dataset with Great Expectations (stage 'validate')."
    )
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATASET_DIR, help="tfds dataset folder"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_REPORT_DIR, help="report folder")
    args = parser.parse_args(argv)
    setup_logging()

    try:
        cfg = load_config(args.params)
        report = run_validate(
            cfg.validate, expected_rows(cfg.data), args.data, args.out, in_child=True
        )
    except (ConfigError, DatasetError) as exc:
        print(f"validate: error: {exc}", file=sys.stderr)
        return 1
    summary = report.summary
    if not report.passed:
        for line in report.failure_lines:
            print(f"validate: FAILED {line}", file=sys.stderr)
        print(
            f"validate: {summary['checks_failed']} of {summary['checks_evaluated']} checks "
            f"failed; the data did not pass validation. Report: {args.out / INDEX_FILE}",
            file=sys.stderr,
        )
        return 1
    log.info(
        "passed: %d checks on %s in %.1f s; report: %s",
        summary["checks_evaluated"],
        ", ".join(f"{c['examples']} {split}" for split, c in summary["counts"].items()),
        report.seconds,
        args.out / INDEX_FILE,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
