"""Replace an output folder (or file) all at once, so a failed or killed run never leaves
half of one.

A stage builds its output in a scratch folder beside the destination (same file system, so
the final move is a rename), then swaps it in with `replace_dir`. The earlier output stays
in place until the new one is complete; `recover_interrupted` repairs what a run killed
between the two renames of the swap left behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


@contextlib.contextmanager
def scratch_beside(out_dir: Path) -> Iterator[Path]:
    """A fresh scratch folder next to `out_dir`, removed on exit whatever happens."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def replace_dir(new_dir: Path, out_dir: Path) -> None:
    """Move `new_dir` to `out_dir`, keeping the old `out_dir` until the new one is in place."""
    backup = None
    if out_dir.exists():
        backup = out_dir.with_name(f".{out_dir.name}.old-{time.time_ns()}")
        out_dir.rename(backup)
    try:
        new_dir.rename(out_dir)
    except BaseException:
        if backup is not None:
            backup.rename(out_dir)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def write_file_atomic(path: Path, data: bytes) -> None:
    """Write `path` beside itself, then rename it into place: readers see old or new, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.tmp")
    scratch.write_bytes(data)
    os.replace(scratch, path)


def recover_interrupted(out_dir: Path) -> None:
    """Undo what a killed run left beside `out_dir`: restore its backup, drop scratch folders.

    `replace_dir` renames the old output to a backup before moving the new one in; a kill
    between the two renames leaves only the backup, which is the earlier run's good output.
    """
    parent = out_dir.parent
    backups = sorted(parent.glob(f".{out_dir.name}.old-*"))
    if backups and not out_dir.exists():
        log.warning("restoring %s from an interrupted run's backup %s", out_dir, backups[-1])
        backups.pop().rename(out_dir)
    for leftover in [*backups, *parent.glob(f".{out_dir.name}.tmp-*")]:
        log.info("removing %s left by an interrupted run", leftover)
        shutil.rmtree(leftover, ignore_errors=True)


def save_model_atomic(model, path: Path) -> None:
    """Save a Keras model (`model.save`) beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        model.save(scratch)
        os.replace(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)
