"""What every stage's command line shares: the parser's common part and the logging setup."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def prefer_onednn() -> None:
    """Turn on oneDNN's kernels unless the user has chosen: they make this project's
    convolutions ~1.35x faster (training, measured by benchmarks/train_throughput.py) to
    ~2x (the evaluation network's inference) on CPUs without AVX-512, where TensorFlow
    leaves them off by default. Has effect only before TensorFlow is imported."""
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


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
