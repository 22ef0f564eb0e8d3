"""What every stage's command line shares: the parser's common part and the logging setup."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def stage_parser(stage: str, description: str) -> argparse.ArgumentParser:
    """`python -m components.<stage>`'s parser, with `--params` and defaults in --help."""
    parser = argparse.ArgumentParser(
        prog=f"python -m components.{stage}",
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")
    return parser


def setup_logging(level: int = logging.INFO) -> None:
    """Our lines as `stage: message` on stdout; the libraries' own narration kept out."""
    logging.basicConfig(level=level, format="%(name)s: %(message)s", stream=sys.stdout)
    # tfds narrates its internals through absl at INFO/WARNING, GX at INFO (doc
    # registration, temporary folders); our own lines say what happens.
    logging.getLogger("absl").setLevel(logging.ERROR)
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
