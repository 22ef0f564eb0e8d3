"""The sample-quality metrics on known answers (components/gan_metrics.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from components import gan_metrics


def gaussian(rng, n, mean, cov):
    return rng.multivariate_normal(mean, cov, size=n)


# ----------------------------------------------------------------------------- FID


def test_fid_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(0)
    features = rng.standard_normal((500, 32)) @ rng.standard_normal((32, 32)) + 3.0
    assert gan_metrics.fid(features, features) == pytest.approx(0.0, abs=1e-6)


def test_fid_of_a_set_with_a_constant_feature_is_still_zero_with_itself():
    # A singular covariance (one dead ReLU unit) must not make the distance complex or NaN.
    features = np.random.default_rng(1).standard_normal((300, 8))
    features[:, 3] = 0.0
    assert gan_metrics.fid(features, features) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_matches_the_closed_form_for_known_gaussians():
    # Diagonal covariances commute: tr((S1 S2)^1/2) = sum sqrt(s1_i s2_i), so
    # d = |mu1 - mu2|^2 + sum (sqrt(s1_i) - sqrt(s2_i))^2.
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, -1.0, 2.5])
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    assert gan_metrics.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(
        expected, rel=1e-12
    )


def test_frechet_distance_of_rotated_non_commuting_gaussians():
    # S2 = R S1 R^T with R a rotation: same eigenvalues, and for 2x2 covariances
    # tr((S1 S2)^1/2) = sqrt(tr(S1 S2) + 2 sqrt(det(S1 S2))).
    s1 = np.diag([4.0, 1.0])
    angle = 0.7
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    s2 = rot @ s1 @ rot.T
    product = s1 @ s2
    cross = math.sqrt(np.trace(product) + 2 * math.sqrt(np.linalg.det(product)))
    expected = np.trace(s1) + np.trace(s2) - 2 * cross
    zero = np.zeros(2)
    assert gan_metrics.frechet_distance(zero, s1, zero, s2) == pytest.approx(expected, rel=1e-9)


def test_fid_from_samples_approaches_the_population_value():
    rng = np.random.default_rng(2)
    a = gaussian(rng, 20_000, [0, 0], np.diag([1.0, 1.0]))
    b = gaussian(rng, 20_000, [2, 0], np.diag([4.0, 1.0]))
    # |mu|^2 = 4, (sqrt(4) - 1)^2 = 1
    assert gan_metrics.fid(a, b) == pytest.approx(5.0, rel=0.03)


# ----------------------------------------------------------------------------- KID


def test_kid_is_near_zero_for_one_distribution_and_clearly_positive_when_shifted():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((2000, 16))
    b = rng.standard_normal((2000, 16))
    same = gan_metrics.kid(a, b, subsets=20, subset_size=500, seed=0)
    shifted = gan_metrics.kid(a, b + 1.0, subsets=20, subset_size=500, seed=0)
    # unbiased: the mean over subsets scatters around 0, within a few standard errors
    assert abs(same.mean) < 3 * same.std / math.sqrt(same.subsets) + 1e-3
    assert shifted.mean > 0.5
    assert shifted.mean > 50 * abs(same.mean)


def test_kid_subsets_shrink_to_the_smaller_set_and_are_seeded():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((50, 4)), rng.standard_normal((80, 4))
    first = gan_metrics.kid(a, b, subsets=5, subset_size=1000, seed=7)
    assert first.subset_size == 50
    assert first == gan_metrics.kid(a, b, subsets=5, subset_size=1000, seed=7)
    assert first != gan_metrics.kid(a, b, subsets=5, subset_size=1000, seed=8)


def test_unbiased_mmd_of_identical_subsets_is_exact():
    # x with itself: within terms minus the cross term, which includes the diagonal:
    # MMD^2_u(x, x) = 2 * (sum_offdiag K / (m(m-1)) - sum K / m^2)
    x = np.random.default_rng(5).standard_normal((10, 3))
    kernel = (x @ x.T / 3 + 1) ** 3
    m = len(x)
    off = kernel.sum() - np.trace(kernel)
    expected = 2 * (off / (m * (m - 1)) - kernel.sum() / m**2)
    # float32 kernels (for speed), float64 sums: agreement to float32 precision
    assert gan_metrics._unbiased_mmd2(x, x) == pytest.approx(expected, rel=1e-4, abs=1e-5)


# ----------------------------------------------------------------------------- IS


def test_inception_score_bounds():
    classes = 10
    confident_even = np.eye(classes)[np.arange(1000) % classes]
    assert gan_metrics.inception_score(confident_even, splits=10).mean == pytest.approx(classes)
    uniform = np.full((1000, classes), 1.0 / classes)
    assert gan_metrics.inception_score(uniform).mean == pytest.approx(1.0)
    collapsed = np.eye(classes)[np.zeros(1000, dtype=int)]
    assert gan_metrics.inception_score(collapsed).mean == pytest.approx(1.0)


def test_inception_score_of_two_even_classes_is_two():
    probs = np.eye(10)[np.arange(1000) % 2]
    score = gan_metrics.inception_score(probs, splits=5)
    assert score.mean == pytest.approx(2.0)
    assert score.std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_refuses_non_distributions():
    with pytest.raises(ValueError, match="probability distribution"):
        gan_metrics.inception_score(np.ones((10, 10)))


# ----------------------------------------------------------------------------- PRDC


def test_prdc_of_a_set_against_itself_is_one():
    features = np.random.default_rng(6).standard_normal((3000, 8))
    result = gan_metrics.prdc(features, features, k=5)
    assert result.precision == 1.0
    assert result.recall == 1.0
    assert result.coverage == 1.0
    # each ball holds its centre and k - 1 neighbours strictly inside: k per ball, / k
    assert result.density == pytest.approx(1.0)


def test_prdc_against_a_far_away_set_is_zero():
    rng = np.random.default_rng(7)
    real = rng.standard_normal((1000, 8))
    fake = rng.standard_normal((1200, 8)) + 100.0
    assert gan_metrics.prdc(real, fake, k=5) == gan_metrics.Manifolds(0.0, 0.0, 0.0, 0.0, 5)


def test_prdc_separates_fidelity_from_diversity():
    # Fakes that all sit on a small part of the real distribution: precise, not diverse.
    rng = np.random.default_rng(8)
    real = rng.standard_normal((4000, 2))
    fake = rng.standard_normal((4000, 2)) * 0.2
    result = gan_metrics.prdc(real, fake, k=5)
    assert result.precision > 0.95
    assert result.recall < 0.5
    assert result.coverage < 0.3


def test_prdc_matches_a_brute_force_reference_on_a_small_case():
    rng = np.random.default_rng(9)
    real, fake, k = rng.standard_normal((60, 3)), rng.standard_normal((45, 3)) + 0.5, 3
    d_rr = np.linalg.norm(real[:, None] - real[None], axis=2)
    d_ff = np.linalg.norm(fake[:, None] - fake[None], axis=2)
    d_rf = np.linalg.norm(real[:, None] - fake[None], axis=2)
    r_real, r_fake = np.sort(d_rr, axis=1)[:, k], np.sort(d_ff, axis=1)[:, k]
    inside = d_rf < r_real[:, None]
    expected = gan_metrics.Manifolds(
        precision=inside.any(axis=0).mean(),
        recall=(d_rf < r_fake[None, :]).any(axis=1).mean(),
        density=inside.sum(axis=0).mean() / k,
        coverage=(d_rf.min(axis=1) < r_real).mean(),
        k=k,
    )
    got = gan_metrics.prdc(real, fake, k=k)
    for name in ("precision", "recall", "density", "coverage"):
        assert getattr(got, name) == pytest.approx(getattr(expected, name)), name


def test_precomputed_real_radii_give_the_same_answer():
    rng = np.random.default_rng(11)
    real, fake = rng.standard_normal((300, 4)), rng.standard_normal((200, 4)) + 0.3
    radii = gan_metrics.knn_squared_radii(real, 4)
    assert gan_metrics.prdc(real, fake, 4, radii) == gan_metrics.prdc(real, fake, 4)


def test_prdc_chunks_give_the_same_answer(monkeypatch):
    rng = np.random.default_rng(10)
    real, fake = rng.standard_normal((500, 4)), rng.standard_normal((400, 4)) * 1.3
    whole = gan_metrics.prdc(real, fake, k=4)
    monkeypatch.setattr(gan_metrics, "_CHUNK", 64)
    assert gan_metrics.prdc(real, fake, k=4) == whole


def test_prdc_refuses_k_too_large_and_mismatched_features():
    features = np.zeros((5, 2))
    with pytest.raises(ValueError, match="need 1 <= k < the number of samples"):
        gan_metrics.prdc(features, features, k=5)
    with pytest.raises(ValueError, match="feature sizes differ"):
        gan_metrics.prdc(np.zeros((5, 2)), np.zeros((5, 3)), k=2)


def test_features_with_nan_are_refused():
    bad = np.ones((10, 2))
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity"):
        gan_metrics.fid(bad, np.ones((10, 2)))


# ----------------------------------------------------------------------------- classes


def test_class_histogram_even_and_collapsed():
    even = gan_metrics.class_histogram(np.eye(10)[np.arange(500) % 10])
    assert even.shares == (0.1,) * 10
    assert even.entropy == pytest.approx(math.log2(10))
    assert even.normalized_entropy == pytest.approx(1.0)
    assert even.smallest_share == pytest.approx(0.1)
    assert even.classes_present == 10

    collapsed = gan_metrics.class_histogram(np.eye(10)[np.array([3] * 90 + [5] * 10)])
    assert collapsed.shares[3] == pytest.approx(0.9)
    assert collapsed.smallest_share == 0.0
    assert collapsed.classes_present == 2
    expected = -(0.9 * math.log2(0.9) + 0.1 * math.log2(0.1))
    assert collapsed.entropy == pytest.approx(expected)
