"""The train stage on small real data: outputs, resume after a kill, determinism, the NaN
guard, the checkpoint fingerprint, the gate on validation, and MirroredStrategy."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml
from PIL import Image

from components import models, train
from components.config import parse_config
from tests.conftest import REPO_ROOT, ValidatedData, snapshot, validated_data

# A model small enough that an epoch of a few hundred images takes a fraction of a second.
SMOKE = {
    "epochs": 1,
    "batch_size": 32,
    "latent_dim": 16,
    "generator_width": 16,
    "discriminator_width": 8,
    "grid_size": 4,
}


def smoke_config(seed: int = 7, **train_keys):
    return parse_config({"seed": seed, "train": {**SMOKE, **train_keys}})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> ValidatedData:
    return validated_data(tmp_path_factory.mktemp("train-data"), n_train=256)


def run_in(workdir: Path, data: ValidatedData, cfg) -> train.TrainResult:
    """run_train with every output under `workdir`, as the stage lays them out."""
    return train.run_train(
        cfg,
        dataset_dir=data.dataset_dir,
        summary_path=data.summary,
        checkpoint_dir=workdir / "models" / "checkpoints",
        generator_path=workdir / "models" / "generator.keras",
        report_dir=workdir / "reports" / "train",
    )


def weights(path: Path) -> list[np.ndarray]:
    return keras.saving.load_model(path, safe_mode=True).get_weights()


def assert_same_weights(a: Path, b: Path) -> None:
    left, right = weights(a), weights(b)
    assert len(left) == len(right) == 16
    for x, y in zip(left, right, strict=True):
        np.testing.assert_array_equal(x, y)


# ----------------------------------------------------------------------------- the command


def stage_command(workdir: Path, data: ValidatedData, seed: int = 7, **train_keys) -> list[str]:
    params = workdir / "params.yaml"
    params.write_text(yaml.safe_dump({"seed": seed, "train": {**SMOKE, **train_keys}}))
    return [
        sys.executable, "-m", "components.train", "--params", str(params),
        "--dataset-dir", str(data.dataset_dir), "--summary", str(data.summary),
    ]  # fmt: skip


def stage_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1",
            "TF_CPP_MIN_LOG_LEVEL": "2"}  # fmt: skip


def run_stage(command: list[str], workdir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, cwd=workdir, env=stage_env(), capture_output=True, text=True, timeout=300
    )


def test_one_epoch_through_the_command_line(data, tmp_path: Path):
    completed = run_stage(stage_command(tmp_path, data), tmp_path)
    assert completed.returncode == 0, completed.stderr
    epoch_lines = [line for line in completed.stdout.splitlines() if "epoch 1/1 " in line]
    assert len(epoch_lines) == 1 and "g_loss" in epoch_lines[0] and "img/s" in epoch_lines[0]
    assert "256 examples, 8 steps of 32 per epoch" in completed.stdout

    generator = keras.saving.load_model(tmp_path / "models/generator.keras", safe_mode=True)
    images = generator(np.zeros((2, 16), np.float32), training=False)
    assert images.shape == (2, 28, 28, 1)

    report = tmp_path / "reports" / "train"
    summary = json.loads((report / "metrics.json").read_text())
    assert summary["step"] == 1
    assert set(summary["train"]) == {
        "g_loss", "d_loss", "d_real", "d_fake", "images_per_sec", "epoch_seconds",
    }  # fmt: skip
    assert 0 < summary["train"]["d_real"] < 1 and 0 < summary["train"]["d_fake"] < 1
    g_loss = (report / "plots/metrics/train/g_loss.tsv").read_text().splitlines()
    assert g_loss[0] == "step\tg_loss" and len(g_loss) == 2
    frame = Image.open(report / "plots/images/progress/epoch_0001.png")
    assert frame.mode == "L" and frame.size == (118, 118)  # 2x2 images at 2x, 2 px gaps

    checkpoints = tmp_path / "models" / "checkpoints"
    assert tf.train.latest_checkpoint(str(checkpoints)).endswith("ckpt-1")
    assert [r["epoch"] for r in json.loads((checkpoints / "history.json").read_text())] == [1]
    fingerprint = json.loads((checkpoints / "fingerprint.json").read_text())
    assert fingerprint["seed"] == 7 and fingerprint["train"]["generator_width"] == 16
    assert "epochs" not in fingerprint["train"]  # more epochs continue, see below


def test_a_killed_run_resumes_and_ends_with_the_uninterrupted_weights(data, tmp_path: Path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    killed.mkdir(), whole.mkdir()
    command = stage_command(killed, data, epochs=4)
    process = subprocess.Popen(
        command, cwd=killed, env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip
    for line in process.stdout:
        if "checkpoint " in line and "ckpt-1" in line:
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    last = tf.train.latest_checkpoint(str(killed / "models/checkpoints"))
    done = int(last.rsplit("-", 1)[1])
    assert 1 <= done < 4, f"the run was not interrupted: {last}"
    assert not (killed / "models/generator.keras").exists()

    resumed = run_stage(command, killed)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from epoch {done}" in resumed.stdout
    assert f"epoch {done}/4 " not in resumed.stdout and "epoch 4/4 " in resumed.stdout

    uninterrupted = run_stage(stage_command(whole, data, epochs=4), whole)
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    assert "resuming" not in uninterrupted.stdout
    assert_same_weights(killed / "models/generator.keras", whole / "models/generator.keras")
    # The report of the resumed run has every epoch once, with the same losses.
    for run_dir in (killed, whole):
        rows = (run_dir / "reports/train/plots/metrics/train/g_loss.tsv").read_text().split()
        assert rows[0:2] == ["step", "g_loss"] and rows[2::2] == ["1", "2", "3", "4"]
    assert (killed / "reports/train/plots/metrics/train/g_loss.tsv").read_text() == (
        whole / "reports/train/plots/metrics/train/g_loss.tsv"
    ).read_text()
    frames = sorted(p.name for p in (killed / "reports/train/plots/images/progress").iterdir())
    assert frames == [f"epoch_000{i}.png" for i in (1, 2, 3, 4)]


# ----------------------------------------------------------------------------- in process


def test_same_params_give_bit_identical_weights_and_another_seed_does_not(data, tmp_path):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        run_in(tmp_path / name, data, smoke_config(seed=seed, epochs=2))
    assert_same_weights(
        tmp_path / "a/models/generator.keras", tmp_path / "b/models/generator.keras"
    )
    a, c = (
        weights(tmp_path / "a/models/generator.keras"),
        weights(tmp_path / "c/models/generator.keras"),
    )
    assert not np.array_equal(a[0], c[0])


def test_more_epochs_continue_from_the_last_checkpoint(data, tmp_path: Path, caplog):
    run_in(tmp_path, data, smoke_config(epochs=1))
    with caplog.at_level(logging.INFO, logger="train"):
        result = run_in(tmp_path, data, smoke_config(epochs=2))
    assert result.resumed and result.start_epoch == 1 and result.final_epoch == 2
    assert [r["epoch"] for r in result.history] == [1, 2]
    assert "resuming from epoch 1" in caplog.text


def test_a_non_finite_loss_stops_at_once_and_keeps_the_last_good_checkpoint(
    data, tmp_path: Path, monkeypatch
):
    run_in(tmp_path, data, smoke_config(epochs=1))
    before = snapshot(tmp_path)
    real_loss = models.generator_loss
    monkeypatch.setattr(models, "generator_loss", lambda logits: real_loss(logits) * np.nan)
    with pytest.raises(train.NonFiniteLossError) as caught:
        run_in(tmp_path, data, smoke_config(epochs=3))
    message = str(caught.value)
    assert message.startswith("epoch 2, step 1: non-finite loss (generator nan")
    assert "no checkpoint was written after it" in message
    # Checkpoints, history, generator and report: all as the good run left them.
    assert snapshot(tmp_path) == before


def test_checkpoints_of_other_params_are_not_reused(data, tmp_path: Path, caplog):
    run_in(tmp_path, data, smoke_config(epochs=1, learning_rate=1e-3))
    with caplog.at_level(logging.INFO, logger="train"):
        result = run_in(tmp_path, data, smoke_config(epochs=2))
    assert not result.resumed and [r["epoch"] for r in result.history] == [1, 2]
    assert "starting fresh" in caplog.text and "different train.learning_rate" in caplog.text
    stored = json.loads((tmp_path / "models/checkpoints/fingerprint.json").read_text())
    assert stored["train"]["learning_rate"] == 2e-4


def test_a_run_that_starts_fresh_and_fails_keeps_the_old_checkpoints(
    data, tmp_path: Path, monkeypatch
):
    run_in(tmp_path, data, smoke_config(epochs=1, learning_rate=1e-3))
    before = snapshot(tmp_path / "models")
    assert "checkpoints/frames/epoch_0001.png" in before
    real_loss = models.discriminator_loss
    monkeypatch.setattr(
        models, "discriminator_loss", lambda real, fake: real_loss(real, fake) + np.inf
    )
    with pytest.raises(train.NonFiniteLossError, match="epoch 1, step 1: .*discriminator inf"):
        run_in(tmp_path, data, smoke_config(epochs=1))
    assert snapshot(tmp_path / "models") == before

    # Failing later, after a whole epoch (and its sample grid) but before the first save:
    # the old run's checkpoints, history and frames are still all there, unchanged.
    monkeypatch.setattr(models, "discriminator_loss", real_loss)
    real_epoch = train._run_epoch

    def failing_second_epoch(*args):
        if args[5] == 2:
            raise train.NonFiniteLossError("epoch 2, step 1: stand-in failure")
        return real_epoch(*args)

    monkeypatch.setattr(train, "_run_epoch", failing_second_epoch)
    with pytest.raises(train.NonFiniteLossError, match="stand-in"):
        run_in(tmp_path, data, smoke_config(epochs=2, checkpoint_every=2))
    assert snapshot(tmp_path / "models") == before


def test_another_dataset_starts_fresh(data, tmp_path: Path, caplog):
    run_in(tmp_path, data, smoke_config(epochs=1))
    other = validated_data(tmp_path / "other", n_train=128)
    with caplog.at_level(logging.INFO, logger="train"):
        result = run_in(tmp_path, other, smoke_config(epochs=1))
    assert not result.resumed and "different dataset" in caplog.text


def test_a_checkpoint_that_does_not_fit_the_model_is_an_error(data, tmp_path: Path):
    run_in(tmp_path, data, smoke_config(epochs=1))
    # Pretend the checkpoints were made for a wider generator: the fingerprint matches,
    # the variables do not, and restoring must say so rather than train on garbage.
    wider = smoke_config(epochs=2, generator_width=32)
    fingerprint = tmp_path / "models/checkpoints/fingerprint.json"
    dataset_fp = json.loads(fingerprint.read_text())["dataset"]
    fingerprint.write_text(json.dumps(train.training_fingerprint(wider, dataset_fp)))
    with pytest.raises(train.TrainingError, match="does not fit the model"):
        run_in(tmp_path, data, wider)


@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_mixed_precision_trains(data, tmp_path: Path, precision):
    result = run_in(tmp_path, data, smoke_config(mixed_precision=precision, grid_size=1))
    assert np.isfinite(result.history[0]["g_loss"])
    generator = keras.saving.load_model(tmp_path / "models/generator.keras", safe_mode=True)
    assert generator.output.dtype == "float32"
    assert keras.mixed_precision.global_policy().name == "float32"  # restored afterwards


# ----------------------------------------------------------------------------- refusals


def test_unvalidated_or_failed_or_changed_data_is_refused(data, tmp_path: Path):
    cfg = smoke_config()
    missing = ValidatedData(data.dataset_dir, tmp_path / "nothing.json")
    with pytest.raises(
        train.UnvalidatedDataError, match="has not been validated; run `dvc repro validate`"
    ):
        run_in(tmp_path, missing, cfg)

    failed = tmp_path / "failed.json"
    failed.write_text(
        json.dumps(
            {"passed": False, "failed": [{"table": "train_examples", "check": "duplicates"}]}
        )
    )
    with pytest.raises(
        train.UnvalidatedDataError, match=r"failed validation \(train_examples: duplicates\)"
    ):
        run_in(tmp_path, ValidatedData(data.dataset_dir, failed), cfg)

    stale = tmp_path / "stale.json"
    stale.write_text(json.dumps({"passed": True, "dataset_fingerprint": "0" * 64}))
    with pytest.raises(train.UnvalidatedDataError, match="changed after it was validated"):
        run_in(tmp_path, ValidatedData(data.dataset_dir, stale), cfg)
    assert not (tmp_path / "models").exists()


def test_a_batch_larger_than_the_data_is_refused_by_key(data, tmp_path: Path):
    with pytest.raises(train.TrainingError, match=r"train.batch_size: 512 is more than the 256"):
        run_in(tmp_path, data, smoke_config(batch_size=512))


def test_bad_params_fail_the_command_naming_the_key(data, tmp_path: Path):
    completed = run_stage(stage_command(tmp_path, data, strategy="gpus"), tmp_path)
    assert completed.returncode == 1
    assert (
        "train.strategy: Input should be 'auto', 'mirrored' or 'multi_worker'" in completed.stderr
    )
    assert not (tmp_path / "models").exists()


def test_multi_worker_without_a_cluster_is_refused():
    with pytest.raises(train.TrainingError, match="needs TF_CONFIG"):
        train.make_strategy("multi_worker")


# ----------------------------------------------------------------------------- distribution

MIRRORED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import tensorflow as tf
    # Two logical CPUs: MirroredStrategy's two replicas, as on a machine with two GPUs.
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
    from components import train
    from components.cli import setup_logging
    from components.config import parse_config
    setup_logging()
    cfg = parse_config(json.loads(sys.argv[1]))
    dataset, summary, out = map(Path, sys.argv[2:5])
    result = train.run_train(cfg, dataset, summary, out / "ckpt", out / "g.keras", out / "report")
    print(json.dumps(result.history))
    """
)


def run_on_two_cpus(data: ValidatedData, out: Path, **train_keys) -> subprocess.CompletedProcess:
    params = {"seed": 7, "train": {**SMOKE, "strategy": "mirrored", **train_keys}}
    return subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT, json.dumps(params), str(data.dataset_dir),
         str(data.summary), str(out)],
        cwd=out, env=stage_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_mirrored_strategy_over_two_logical_cpus(data, tmp_path: Path):
    completed = run_on_two_cpus(data, tmp_path, epochs=2)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "MirroredStrategy, 2 replica(s)" in completed.stdout
    history = json.loads(completed.stdout.strip().splitlines()[-1])
    assert [r["epoch"] for r in history] == [1, 2]
    assert all(np.isfinite(r["g_loss"]) and np.isfinite(r["d_loss"]) for r in history)
    # The step really learns across replicas: the discriminator separates real from fake.
    assert history[-1]["d_real"] > history[-1]["d_fake"]
    assert keras.saving.load_model(tmp_path / "g.keras").output_shape == (None, 28, 28, 1)


def test_an_uneven_split_over_replicas_is_refused(data, tmp_path: Path):
    completed = run_on_two_cpus(data, tmp_path, batch_size=33)
    assert completed.returncode != 0
    assert "train.batch_size: 33 does not split over 2 replicas" in completed.stderr


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_samples_come_from_the_weight_average_when_it_is_on(data, tmp_path: Path, ema_decay):
    cfg = smoke_config(epochs=1, ema_decay=ema_decay)
    run_in(tmp_path, data, cfg)
    gan = train.build_gan(cfg, "float32")
    latest = tf.train.latest_checkpoint(str(tmp_path / "models/checkpoints"))
    gan.checkpoint.restore(latest).assert_existing_objects_matched()
    saved = weights(tmp_path / "models/generator.keras")
    raw, average = gan.generator.get_weights(), gan.sampler.get_weights()
    for s, r, a in zip(saved, raw, average, strict=True):
        np.testing.assert_array_equal(s, a)  # the model saved is the sampler ...
        if ema_decay == 0:
            np.testing.assert_array_equal(s, r)  # ... which is the generator itself
    if ema_decay:
        assert not all(np.array_equal(s, r) for s, r in zip(saved, raw, strict=True))
