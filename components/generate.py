"""Stage `generate`: the trained generator's samples, as versioned artifacts.

Loads `models/generator.keras` (in Keras' safe mode) and writes `samples/`:

- `samples.npz`: key `images`, uint8 [N, 28, 28], N = `generate.num_samples`, from seeded
  noise (what the evaluate stage scores);
- `grid.png`: the grid of the fixed latent batch that training drew after every epoch,
  enlarged to judge by eye;
- `progress.gif`: training's per-epoch grids in order, each captioned with its epoch;
- `interpolation.png`: one row per pair of random latent points, walked by slerp.

Every file depends only on the generator's weights, the params and the training frames:
two runs with the same inputs write byte-identical files (no timestamps anywhere). The
folder is built aside and swapped in whole, so a failed run leaves the previous one.
"""

from __future__ import annotations

import io
import logging
import re
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from components.atomic import recover_interrupted, replace_dir, scratch_beside
from components.cli import setup_logging, stage_parser
from components.config import Config, ConfigError, load_config
from components.images import (
    gif_bytes,
    image_grid,
    pad_to,
    png_bytes,
    to_uint8,
    with_caption,
)
from components.latents import SAMPLES_STREAM, fixed_latents, interpolation_latents, standard_normal

log = logging.getLogger("generate")

DEFAULT_GENERATOR = Path("models/generator.keras")
DEFAULT_FRAMES_DIR = Path("reports/train/plots/images/progress")
DEFAULT_OUT_DIR = Path("samples")
SAMPLES_FILE = "samples.npz"
GRID_FILE = "grid.png"
PROGRESS_FILE = "progress.gif"
INTERPOLATION_FILE = "interpolation.png"
IMAGE_SIZE = (28, 28)
BATCH = 500  # images per generator call: big enough to be efficient, small in memory
GRID_SCALE = 4  # 28 px garments drawn 112 px wide in grid.png
FRAME_MS, LAST_FRAME_MS = 600, 2500
_FRAME_NAME = re.compile(r"epoch_(\d+)\.png")
# A fixed date for the zip entries of samples.npz (NumPy would stamp the current time).
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


class GenerateError(RuntimeError):
    """The generator or the training frames cannot be used; says what to do."""


@dataclass(frozen=True)
class GenerateResult:
    out_dir: Path
    num_samples: int
    frames: int
    seconds: float


# ----------------------------------------------------------------------------- inputs


def load_generator(path: Path):
    """The trained generator, loaded in safe mode (no code from the file runs)."""
    if not path.is_file():
        raise GenerateError(f"{path}: no trained generator; run `dvc repro train` first")
    import keras  # TensorFlow loads only once the inputs are known to exist

    try:
        generator = keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises several kinds for a damaged or foreign file
        raise GenerateError(f"{path}: not a loadable Keras model ({exc})") from exc
    shape = tuple(generator.output_shape[1:])
    if shape not in {(*IMAGE_SIZE, 1), IMAGE_SIZE}:
        raise GenerateError(f"{path}: the model makes images of shape {shape}, not 28x28")
    return generator


def progress_frames(frames_dir: Path) -> list[tuple[int, np.ndarray]]:
    """Training's per-epoch grids [(epoch, uint8 [H, W])], in epoch order."""
    from PIL import Image

    named = [(_FRAME_NAME.fullmatch(p.name), p) for p in frames_dir.glob("epoch_*.png")]
    frames = sorted((int(match.group(1)), path) for match, path in named if match)
    if not frames:
        raise GenerateError(
            f"{frames_dir}: no per-epoch grids (epoch_NNNN.png) from training; "
            "run `dvc repro train` first"
        )
    return [(epoch, np.asarray(Image.open(path).convert("L"))) for epoch, path in frames]


# ----------------------------------------------------------------------------- outputs


def generate_images(generator, latents: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] from latents [N, latent_dim], in batches of BATCH."""
    parts = []
    for start in range(0, len(latents), BATCH):
        images = generator(latents[start : start + BATCH], training=False)
        parts.append(to_uint8(np.asarray(images)).reshape(-1, *IMAGE_SIZE))
    images = np.concatenate(parts)
    assert images.shape == (len(latents), *IMAGE_SIZE), images.shape
    return images


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """What `np.savez` writes, minus its timestamps: loads with `np.load(allow_pickle=False)`."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE), member.getvalue())
    return buffer.getvalue()


def progress_gif(frames: list[tuple[int, np.ndarray]]) -> bytes:
    """The grids as an animation, each frame captioned `epoch N`; sizes padded to the largest
    (a run whose grid_size changed part-way has frames of two sizes)."""
    height = max(frame.shape[0] for _, frame in frames)
    width = max(frame.shape[1] for _, frame in frames)
    captioned = [
        with_caption(pad_to(frame, height, width), f"epoch {epoch}") for epoch, frame in frames
    ]
    return gif_bytes(captioned, FRAME_MS, LAST_FRAME_MS)


# ----------------------------------------------------------------------------- the stage


def run_generate(
    cfg: Config,
    generator_path: Path = DEFAULT_GENERATOR,
    frames_dir: Path = DEFAULT_FRAMES_DIR,
    out_dir: Path = DEFAULT_OUT_DIR,
) -> GenerateResult:
    started = time.perf_counter()
    frames = progress_frames(frames_dir)  # cheap checks first, before TensorFlow loads
    generator = load_generator(generator_path)

    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(cfg.seed)
    tf.config.experimental.enable_op_determinism()
    latent_dim = int(generator.input_shape[-1])
    gen = cfg.generate

    log.info("generating %d samples with %s", gen.num_samples, generator_path)
    samples = generate_images(
        generator, standard_normal(cfg.seed, SAMPLES_STREAM, gen.num_samples, latent_dim)
    )
    grid = generate_images(generator, fixed_latents(cfg.seed, cfg.train.grid_size, latent_dim))
    walks = generate_images(
        generator,
        interpolation_latents(
            cfg.seed, gen.interpolation_pairs, gen.interpolation_steps, latent_dim
        ),
    )

    out_dir = Path(out_dir)
    recover_interrupted(out_dir)
    with scratch_beside(out_dir) as scratch:
        folder = scratch / out_dir.name
        folder.mkdir()
        (folder / SAMPLES_FILE).write_bytes(npz_bytes(images=samples))
        (folder / GRID_FILE).write_bytes(png_bytes(image_grid(grid, scale=GRID_SCALE)))
        (folder / INTERPOLATION_FILE).write_bytes(
            png_bytes(image_grid(walks, scale=GRID_SCALE // 2, cols=gen.interpolation_steps))
        )
        (folder / PROGRESS_FILE).write_bytes(progress_gif(frames))
        replace_dir(folder, out_dir)
    return GenerateResult(out_dir, gen.num_samples, len(frames), time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("generate", __doc__.splitlines()[0])
    parser.add_argument("--generator", type=Path, default=DEFAULT_GENERATOR)
    parser.add_argument("--frames-dir", type=Path, default=DEFAULT_FRAMES_DIR)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(args.params)
        result = run_generate(cfg, args.generator, args.frames_dir, args.out_dir)
    except (ConfigError, GenerateError) as exc:
        print(f"generate: {exc}", file=sys.stderr)
        return 1
    log.info(
        "done in %.1f s: %d samples, %d progress frames in %s",
        result.seconds, result.num_samples, result.frames, result.out_dir,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
