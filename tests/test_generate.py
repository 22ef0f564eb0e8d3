"""The generate stage: samples, grid, progress animation and interpolations, byte for byte
reproducible; and the latent helpers behind them."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from components import generate, latents, models
from components.config import parse_config
from components.images import TEXT_BAND, image_grid, png_bytes, to_uint8
from tests.conftest import REPO_ROOT, assert_stage_refuses_params, snapshot

LATENT_DIM = 16
PARAMS = {
    "seed": 3,
    "train": {"grid_size": 9},
    "generate": {"num_samples": 700, "interpolation_pairs": 3, "interpolation_steps": 5},
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A small untrained generator, saved as train saves it, and three progress frames."""
    import keras

    root = tmp_path_factory.mktemp("generate-inputs")
    keras.utils.set_random_seed(0)
    generator_path = root / "generator.keras"
    models.build_generator(latent_dim=LATENT_DIM, width=16).save(generator_path)
    frames = root / "progress"
    frames.mkdir()
    for epoch in (1, 2, 10):  # numeric, not lexical, order: 10 comes last
        frame = np.full((60, 60), 20 * epoch, dtype=np.uint8)
        (frames / f"epoch_{epoch:04d}.png").write_bytes(png_bytes(frame))
    return generator_path, frames


def run_in(out: Path, inputs, **params) -> generate.GenerateResult:
    cfg = parse_config({**PARAMS, **params})
    return generate.run_generate(cfg, inputs[0], inputs[1], out)


def test_outputs_have_the_documented_form(inputs, tmp_path: Path):
    result = run_in(tmp_path / "samples", inputs)
    out = tmp_path / "samples"
    assert sorted(p.name for p in out.iterdir()) == [
        "grid.png", "interpolation.png", "progress.gif", "samples.npz",
    ]  # fmt: skip
    assert (result.num_samples, result.frames) == (700, 3)

    with np.load(out / "samples.npz", allow_pickle=False) as archive:
        assert archive.files == ["images"]
        images = archive["images"]
    assert images.dtype == np.uint8 and images.shape == (700, 28, 28)
    assert images.std() > 0  # not blank

    grid = np.asarray(Image.open(out / "grid.png"))
    cell = 28 * generate.GRID_SCALE + 2
    assert grid.shape == (3 * cell + 2, 3 * cell + 2)  # 9 images, 3 x 3, 112 px each

    walk = np.asarray(Image.open(out / "interpolation.png"))
    cell = 28 * generate.GRID_SCALE // 2 + 2
    assert walk.shape == (3 * cell + 2, 5 * cell + 2)  # a row per pair, a column per step


def test_the_grid_shows_the_fixed_latent_batch_that_training_draws(inputs, tmp_path: Path):
    import keras

    run_in(tmp_path / "samples", inputs)
    generator = keras.saving.load_model(inputs[0], safe_mode=True)
    batch = latents.fixed_latents(PARAMS["seed"], 9, LATENT_DIM)
    expected = image_grid(to_uint8(generator(batch, training=False)), scale=generate.GRID_SCALE)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "samples" / "grid.png")), expected)


def test_the_animation_has_one_captioned_frame_per_epoch_in_order(inputs, tmp_path: Path):
    run_in(tmp_path / "samples", inputs)
    gif = Image.open(tmp_path / "samples" / "progress.gif")
    assert gif.n_frames == 3 and gif.info["loop"] == 0
    bodies, durations = [], []
    for index in range(gif.n_frames):
        gif.seek(index)
        frame = np.asarray(gif.convert("L"))
        durations.append(gif.info["duration"])
        band, body = frame[:TEXT_BAND], frame[TEXT_BAND:]
        assert band.max() == 255 and band.min() == 0  # white caption text on black
        bodies.append(int(body.mean()))
    assert bodies == [20, 40, 200]  # epochs 1, 2, 10
    assert durations == [generate.FRAME_MS] * 2 + [generate.LAST_FRAME_MS]
    # the captions differ: "epoch 1", "epoch 2", "epoch 10"
    captions = set()
    for index in range(3):
        gif.seek(index)
        captions.add(np.asarray(gif.convert("L"))[:TEXT_BAND].tobytes())
    assert len(captions) == 3


def test_same_seed_gives_byte_identical_outputs_in_another_process(inputs, tmp_path: Path):
    run_in(tmp_path / "a", inputs)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(PARAMS))
    completed = subprocess.run(
        [sys.executable, "-m", "components.generate", "--params", str(params),
         "--generator", str(inputs[0]), "--frames-dir", str(inputs[1]),
         "--out-dir", str(tmp_path / "b")],
        cwd=REPO_ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert "done in" in completed.stdout and "700 samples, 3 progress frames" in completed.stdout
    first, second = snapshot(tmp_path / "a"), snapshot(tmp_path / "b")
    assert first.keys() == second.keys() and len(first) == 4
    for name in first:
        assert first[name] == second[name], name


def test_another_seed_gives_other_samples(inputs, tmp_path: Path):
    run_in(tmp_path / "a", inputs)
    run_in(tmp_path / "b", inputs, seed=4)
    a = np.load(tmp_path / "a" / "samples.npz")["images"]
    b = np.load(tmp_path / "b" / "samples.npz")["images"]
    assert not np.array_equal(a, b)


def test_missing_inputs_are_named_and_earlier_samples_kept(inputs, tmp_path: Path):
    out = tmp_path / "samples"
    run_in(out, inputs)
    before = snapshot(out)
    cfg = parse_config(PARAMS)
    with pytest.raises(generate.GenerateError, match="no trained generator; run `dvc repro"):
        generate.run_generate(cfg, tmp_path / "nope.keras", inputs[1], out)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(generate.GenerateError, match="no per-epoch grids"):
        generate.run_generate(cfg, inputs[0], empty, out)
    not_a_model = tmp_path / "junk.keras"
    not_a_model.write_bytes(b"not a zip")
    with pytest.raises(generate.GenerateError, match="not a loadable Keras model"):
        generate.run_generate(cfg, not_a_model, inputs[1], out)
    assert snapshot(out) == before


def test_the_command_line_names_a_bad_key(tmp_path: Path):
    assert_stage_refuses_params(
        "generate", {"generate": {"num_samples": 0}},
        "generate.num_samples: Input should be greater than or equal to 2", tmp_path,
    )  # fmt: skip


def test_npz_bytes_round_trip_without_pickle_and_without_timestamps():
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    data = generate.npz_bytes(images=images)
    assert data == generate.npz_bytes(images=images)
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        assert np.array_equal(archive["images"], images)


# ----------------------------------------------------------------------------- latents


def test_slerp_ends_at_its_points_and_keeps_the_norm_of_equal_norm_ends():
    a = np.array([3.0, 0.0, 0.0, 4.0], np.float32)
    b = np.array([0.0, 5.0, 0.0, 0.0], np.float32)
    path = latents.slerp(a, b, np.linspace(0, 1, 7))
    np.testing.assert_allclose(path[0], a, atol=1e-6)
    np.testing.assert_allclose(path[-1], b, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(path, axis=1), 5.0, rtol=1e-6)
    # a straight line would dip to norm 5 / sqrt(2) half-way
    assert np.linalg.norm((a + b) / 2) == pytest.approx(5 / np.sqrt(2))


def test_slerp_of_parallel_points_falls_back_to_a_line():
    a = np.ones(3, np.float32)
    path = latents.slerp(a, 2 * a, np.array([0.0, 0.5, 1.0]))
    np.testing.assert_allclose(path, [a, 1.5 * a, 2 * a], atol=1e-6)


def test_latent_streams_are_fixed_by_the_seed_and_independent():
    grid = latents.fixed_latents(1, 4, 8)
    assert np.array_equal(grid, latents.fixed_latents(1, 4, 8))
    assert not np.array_equal(grid, latents.fixed_latents(2, 4, 8))
    samples = latents.standard_normal(1, latents.SAMPLES_STREAM, 4, 8)
    assert not np.array_equal(grid, samples)
    walk = latents.interpolation_latents(1, pairs=2, steps=3, latent_dim=8)
    assert walk.shape == (6, 8) and walk.dtype == np.float32
