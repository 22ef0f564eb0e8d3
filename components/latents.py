"""Seeded latent vectors: the fixed grid batch, the sample set, interpolation paths.

NumPy only, each kind from its own stream of the run's seed, so that none depends on
(or disturbs) another or TensorFlow's random numbers: the grid that training draws after
every epoch and generate's `samples/grid.png` come from the very same vectors.
"""

from __future__ import annotations

import numpy as np

# One stream per purpose: numpy's SeedSequence mixes [seed, stream] into independent states.
GRID_STREAM = 0x6A1D
SAMPLES_STREAM = 0x5A3D
INTERPOLATION_STREAM = 0x1E7B


def standard_normal(seed: int, stream: int, count: int, latent_dim: int) -> np.ndarray:
    """float32 [count, latent_dim] from N(0, I), fixed by (seed, stream)."""
    latents = np.random.default_rng([seed, stream]).standard_normal((count, latent_dim))
    return latents.astype(np.float32)


def fixed_latents(seed: int, count: int, latent_dim: int) -> np.ndarray:
    """The latent batch [count, latent_dim] behind every sample grid of a run."""
    return standard_normal(seed, GRID_STREAM, count, latent_dim)


def slerp(start: np.ndarray, end: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Spherical interpolation [len(fractions), D] from `start` [D] to `end` [D].

    Gaussian latents concentrate near a sphere of radius sqrt(D); a straight line between
    two of them passes through the lower-norm interior the generator rarely saw in
    training, a great-circle arc stays on the shell (White 2016). Falls back to a straight
    line when the two points are (anti)parallel.
    """
    start, end = np.asarray(start, np.float64), np.asarray(end, np.float64)
    fractions = np.asarray(fractions, np.float64)[:, None]
    cos = np.dot(start, end) / (np.linalg.norm(start) * np.linalg.norm(end))
    angle = np.arccos(np.clip(cos, -1.0, 1.0))
    if np.sin(angle) < 1e-6:
        path = (1.0 - fractions) * start + fractions * end
    else:
        path = (
            np.sin((1.0 - fractions) * angle) * start + np.sin(fractions * angle) * end
        ) / np.sin(angle)
    return path.astype(np.float32)


def interpolation_latents(seed: int, pairs: int, steps: int, latent_dim: int) -> np.ndarray:
    """[pairs * steps, latent_dim]: row i walks by slerp from one random point to another."""
    ends = standard_normal(seed, INTERPOLATION_STREAM, 2 * pairs, latent_dim)
    fractions = np.linspace(0.0, 1.0, steps)
    rows = [slerp(ends[2 * i], ends[2 * i + 1], fractions) for i in range(pairs)]
    return np.concatenate(rows).reshape(pairs * steps, latent_dim)
