"""The Makefile's promise: once the environment is built, a second `make` installs nothing."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import REPO_ROOT


def test_environment_is_up_to_date_after_it_was_built():
    if shutil.which("make") is None or not list((REPO_ROOT / ".venv").glob(".synced*")):
        pytest.skip("the environment was not built by make (no .venv/.synced stamp)")
    # `make -q` exits 0 only when the target needs no work: a rebuild rule that fires
    # every time (reinstalling ~3 GB) would make it exit 1.
    completed = subprocess.run(["make", "-q", "env"], cwd=REPO_ROOT, capture_output=True)
    assert completed.returncode == 0, "make would rebuild the environment a second time"
