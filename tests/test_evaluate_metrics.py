"""Evaluation metrics, each against an independent computation written here."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.linalg
from scipy import ndimage
from scipy.spatial.distance import cdist

from xreal.evaluate import metrics
from xreal.evaluate.metrics import (
    FeatureStats,
    auroc,
    auroc_interval,
    bootstrap_interval,
    change_share,
    frechet_distance,
    frechet_distance_of,
    frechet_interval,
    kid,
    mean_interval,
    ms_ssim,
    pairwise_ms_ssim,
    prdc,
    share_interval,
)

# --- Fréchet distance ------------------------------------------------------------------------------------------


def _gaussian_frechet_commuting(m1, s1, m2, s2) -> float:
    """Closed form for covariances with common eigenvectors and eigenvalues s1, s2."""
    return float(((m1 - m2) ** 2).sum() + (s1 + s2 - 2.0 * np.sqrt(s1 * s2)).sum())


def test_frechet_distance_of_diagonal_and_commuting_gaussians_matches_closed_form():
    rng = np.random.default_rng(1)
    d = 6
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = _gaussian_frechet_commuting(m1, s1, m2, s2)
    assert frechet_distance(m1, np.diag(s1), m2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    rotation, _ = np.linalg.qr(rng.normal(size=(d, d)))
    c1, c2 = rotation @ np.diag(s1) @ rotation.T, rotation @ np.diag(s2) @ rotation.T
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(expected, rel=1e-9)
    # one dimension: (m1 - m2)^2 + (sd1 - sd2)^2
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]), np.array([[9.0]])) == pytest.approx(
        4.0 + 1.0
    )


def test_frechet_distance_of_non_commuting_covariances_matches_scipy_sqrtm():
    rng = np.random.default_rng(2)
    d = 12
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    c1, c2 = a @ a.T / d + 0.05 * np.eye(d), b @ b.T / d + 0.05 * np.eye(d)
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    root = scipy.linalg.sqrtm(c1 @ c2)
    expected = ((m1 - m2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2.0 * np.trace(root).real
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(m2, c2, m1, c1) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_of_singular_covariances_is_real_and_never_negative():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 20)) * 1e3  # 4 points in 20 dimensions: rank 3 covariance
    cov = np.cov(x, rowvar=False)
    mean = x.mean(axis=0)
    same = frechet_distance(mean, cov, mean, cov)
    assert np.isfinite(same) and 0.0 <= same <= 1e-6 * np.trace(cov)
    y = rng.normal(size=(4, 20)) * 1e3
    other = frechet_distance(mean, cov, y.mean(axis=0), np.cov(y, rowvar=False))
    # independent: the trace term through scipy's sqrtm of both singular matrices, real part, rounding allowed
    root = scipy.linalg.sqrtm(scipy.linalg.sqrtm(cov).real @ np.cov(y, rowvar=False) @ scipy.linalg.sqrtm(cov).real)
    expected = ((mean - y.mean(0)) ** 2).sum() + np.trace(cov) + np.trace(np.cov(y, rowvar=False))
    expected -= 2.0 * np.trace(root).real
    assert other == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_of_samples_approaches_the_closed_form():
    rng = np.random.default_rng(4)
    d = 4
    m1, m2 = np.zeros(d), np.array([1.0, -0.5, 0.0, 0.25])
    s1, s2 = np.array([1.0, 2.0, 0.5, 1.0]), np.array([2.0, 1.0, 0.5, 3.0])
    expected = _gaussian_frechet_commuting(m1, s1, m2, s2)
    a = m1 + rng.normal(size=(200_000, d)) * np.sqrt(s1)
    b = m2 + rng.normal(size=(200_000, d)) * np.sqrt(s2)
    assert frechet_distance_of(a.astype(np.float32), b.astype(np.float32)) == pytest.approx(expected, rel=0.02)
    small = frechet_distance_of(a[:200], b[:200])
    assert abs(small - expected) > abs(frechet_distance_of(a, b) - expected)  # the estimate converges


def test_feature_stats_streamed_in_uneven_chunks_equals_the_whole():
    rng = np.random.default_rng(5)
    x = (rng.normal(size=(12_000, 7)) * [1, 2, 3, 4, 5, 6, 7] + 1000.0).astype(np.float32)
    stats = FeatureStats()
    for lo, hi in itertools.pairwise([0, 1, 8, 108, 111, 111, 10_000, 12_000]):  # incl. an empty and a > 8192 chunk
        stats.update(x[lo:hi])
    whole = x.astype(np.float64)
    assert stats.count == 12_000 and stats.dim == 7
    np.testing.assert_allclose(stats.mean, whole.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.covariance(), np.cov(whole, rowvar=False), rtol=1e-9)
    with pytest.raises(ValueError):
        stats.update(np.zeros((2, 6)))
    with pytest.raises(ValueError):
        FeatureStats(3).covariance()


def test_frechet_interval_contains_the_estimate_and_narrows_with_more_data(monkeypatch):
    rng = np.random.default_rng(6)
    a = rng.normal(size=(4000, 8))
    b = rng.normal(size=(4000, 8)) * 1.2 + 0.3
    point = frechet_distance_of(a, b)
    low, high = frechet_interval(a, b, rounds=100)
    assert low < point < high
    assert frechet_interval(a, b, rounds=100, method="percentile")[0] < point  # little bias at d = 8
    small_low, small_high = frechet_interval(a[:400], b[:400], rounds=100)
    assert small_high - small_low > 2.0 * (high - low)
    # the block bootstrap used for very large sets agrees with the point bootstrap
    monkeypatch.setattr(metrics, "_EXACT_BOOTSTRAP_FLOPS", 0)
    block_low, block_high = frechet_interval(a, b, rounds=100)
    assert block_low < point < block_high
    assert 0.5 < (block_high - block_low) / (high - low) < 2.0


def test_frechet_interval_methods_handle_the_sampling_bias():
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(500, 64)), rng.normal(size=(500, 64))  # one distribution: the true distance is 0
    point = frechet_distance_of(a, b)
    values = metrics.frechet_bootstrap(a, b, rounds=100, seed=3)
    assert values.shape == (100,) and values.min() > point  # resampling adds the bias once more
    q_low, q_high = np.percentile(values, [2.5, 97.5])
    shift = values.mean() - point
    assert frechet_interval(a, b, 100, seed=3, method="percentile") == pytest.approx((q_low, q_high))
    assert frechet_interval(a, b, 100, seed=3) == pytest.approx((q_low - shift, q_high - shift))
    basic = frechet_interval(a, b, 100, seed=3, method="basic")
    assert basic == pytest.approx((max(2 * point - q_high, 0.0), 2 * point - q_low))
    assert basic[0] <= 0.1 * point  # the bias-corrected interval reaches down to the truth, 0
    with pytest.raises(ValueError):
        frechet_interval(a, b, method="bca")


def test_frechet_difference_pairs_the_requests_and_sees_a_gap_unpaired_intervals_miss():
    rng = np.random.default_rng(8)
    real = rng.normal(size=(300, 16))
    shared = rng.normal(size=(300, 16))  # what both models draw for the same requests
    a = shared + 0.02 * rng.normal(size=(300, 16))
    b = a + np.r_[0.25, np.zeros(15)]  # b sits a little further off along one feature
    difference, low, high = metrics.frechet_difference(a, b, real, rounds=100, seed=1)
    assert difference == pytest.approx(frechet_distance_of(a, real) - frechet_distance_of(b, real))
    assert low < difference < high < 0  # a is closer, and the paired interval says so
    a_high = frechet_interval(a, real, rounds=100, seed=1)[1]
    b_low = frechet_interval(b, real, rounds=100, seed=1)[0]
    assert a_high > b_low  # the two intervals overlap: read apart, the gap is lost in the noise
    same = metrics.frechet_difference(a, a, real, rounds=20)
    assert same == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="paired row by row"):
        metrics.frechet_difference(a, b[:200], real)


# --- KID -------------------------------------------------------------------------------------------------------


def _mmd2_double_loop(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]

    def k(u, v):
        return (float(np.dot(u, v)) / d + 1.0) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2.0 * xy


def test_kid_of_one_subset_matches_the_unbiased_mmd_double_loop():
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(30, 5)), rng.normal(size=(30, 5)) + 0.4
    # a subset as large as both sets is a permutation of each, and the MMD does not depend on order
    mean, std = kid(a, b, subsets=3, subset_size=1000)
    assert mean == pytest.approx(_mmd2_double_loop(a, b), rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_is_about_zero_for_one_distribution_and_positive_for_a_shift():
    rng = np.random.default_rng(8)
    a, b = rng.normal(size=(1000, 16)), rng.normal(size=(1000, 16))
    same_mean, same_std = kid(a, b, subsets=20, subset_size=300)
    shifted_mean, shifted_std = kid(a, b + 0.3, subsets=20, subset_size=300)
    assert abs(same_mean) < 0.02 and abs(same_mean) < 2 * same_std
    assert shifted_mean > 0.1 and shifted_mean > 10 * abs(same_mean) and shifted_mean > 5 * shifted_std


# --- PRDC ------------------------------------------------------------------------------------------------------


def _prdc_brute_force(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    real_radii = np.sort(cdist(real, real), axis=1)[:, k]  # column 0 is the point itself
    fake_radii = np.sort(cdist(fake, fake), axis=1)[:, k]
    d = cdist(real, fake)
    return {
        "precision": (d < real_radii[:, None]).any(axis=0).mean(),
        "recall": (d < fake_radii[None, :]).any(axis=1).mean(),
        "density": (d < real_radii[:, None]).sum(axis=0).mean() / k,
        "coverage": (d.min(axis=1) < real_radii).mean(),
    }


def test_prdc_matches_the_published_definitions_and_chunking_changes_nothing():
    rng = np.random.default_rng(9)
    real = rng.normal(size=(300, 3))
    fake = rng.normal(size=(250, 3)) * 0.7 + 1.2
    expected = _prdc_brute_force(real, fake, k=5)
    assert 0.1 < expected["precision"] < 0.99 and 0.1 < expected["recall"] < 0.99  # a case that tells them apart
    whole = prdc(real, fake, k=5, chunk=100_000, max_points=None)
    chunked = prdc(real, fake, k=5, chunk=7, max_points=None)
    assert whole == pytest.approx(expected, abs=1e-12)
    assert chunked == whole
    assert prdc(real, fake, k=3, chunk=64) == pytest.approx(_prdc_brute_force(real, fake, k=3), abs=1e-12)


def test_prdc_of_identical_and_of_distant_sets():
    rng = np.random.default_rng(10)
    real = rng.normal(size=(200, 4)).astype(np.float32)
    same = prdc(real, real.copy(), k=5, chunk=50)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    # each real ball holds its twin and the k - 1 nearer neighbours, plus the k-th one when the rounding of the tie
    # at its radius falls inside: density between k/k and (k+1)/k
    assert 1.0 <= same["density"] <= 1.2
    far = prdc(real, real + 100.0, k=5)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_prdc_subsamples_sets_larger_than_max_points():
    rng = np.random.default_rng(11)
    real, fake = rng.normal(size=(400, 2)), rng.normal(size=(120, 2)) + 0.2
    assert prdc(real, fake, max_points=400) == prdc(real, fake, max_points=None)
    sub = prdc(real, fake, max_points=100, seed=1)
    assert sub == prdc(real, fake, max_points=100, seed=1)  # reproducible
    assert sub != prdc(real, fake, max_points=None)  # and really on fewer points
    with pytest.raises(ValueError):
        prdc(real[:5], fake, k=5)


# --- MS-SSIM ---------------------------------------------------------------------------------------------------


def _naive_ssim_parts(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Mean SSIM and mean contrast-structure term with scipy's Gaussian filter, valid region only (float64)."""
    c1, c2 = 0.01**2, 0.03**2

    def blur(z):  # radius int(3.5 * 1.5 + 0.5) = 5: the 11-px window; borders cropped, so padding is irrelevant
        return ndimage.gaussian_filter(z, sigma=1.5, truncate=3.5)[5:-5, 5:-5]

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    cs = (2 * cxy + c2) / (vx + vy + c2)
    lum = (2 * mx * my + c1) / (mx**2 + my**2 + c1)
    return float((lum * cs).mean()), float(cs.mean())


def _naive_ms_ssim(x: np.ndarray, y: np.ndarray, scales: int) -> float:
    weights = np.array([0.0448, 0.2856, 0.3001, 0.2363, 0.1333][:scales])
    weights /= weights.sum()
    value = 1.0
    for s in range(scales):
        ssim, cs = _naive_ssim_parts(x, y)
        value *= max(ssim if s == scales - 1 else cs, 0.0) ** weights[s]
        h, w = x.shape[0] // 2 * 2, x.shape[1] // 2 * 2
        x = x[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
        y = y[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    return value


def _smooth_images(count: int, size: int = 64, seed: int = 12) -> np.ndarray:
    rng = np.random.default_rng(seed)
    images = ndimage.gaussian_filter(rng.random((count, size, size)), sigma=(0, 3, 3))
    images = (images - images.min()) / (images.max() - images.min())
    return images.astype(np.float32)


def test_ms_ssim_of_identical_images_is_one_and_falls_monotonically_with_noise():
    base = _smooth_images(2)
    assert ms_ssim(base, base) == pytest.approx([1.0, 1.0], abs=1e-6)
    rng = np.random.default_rng(13)
    noise = rng.normal(size=base.shape).astype(np.float32)
    levels = [0.01, 0.03, 0.1, 0.3]
    values = np.stack([ms_ssim(base, np.clip(base + level * noise, 0, 1)) for level in levels])
    assert (values < 1.0).all()
    assert (np.diff(values, axis=0) < 0).all()


def test_ms_ssim_at_one_and_three_scales_matches_a_naive_implementation():
    images = _smooth_images(3)
    rng = np.random.default_rng(14)
    noisy = np.clip(images + 0.05 * rng.normal(size=images.shape), 0, 1).astype(np.float32)
    x, y = images.astype(np.float64), noisy.astype(np.float64)
    single = ms_ssim(images, noisy, scales=1)
    expected_single = [_naive_ssim_parts(x[i], y[i])[0] for i in range(3)]
    np.testing.assert_allclose(single, expected_single, atol=2e-5)
    assert metrics.max_ms_ssim_scales(64, 64) == 3
    default = ms_ssim(images, noisy)
    np.testing.assert_allclose(default, [_naive_ms_ssim(x[i], y[i], 3) for i in range(3)], atol=2e-5)
    assert not np.allclose(default, single, atol=1e-3)
    assert metrics.max_ms_ssim_scales(176, 176) == 5 and metrics.max_ms_ssim_scales(175, 300) == 4
    with pytest.raises(ValueError):
        ms_ssim(images, noisy, scales=4)


def test_pairwise_ms_ssim_covers_every_pair_or_a_random_subset():
    images = _smooth_images(5, seed=15)
    expected = [ms_ssim(images[i : i + 1], images[j : j + 1])[0] for i, j in itertools.combinations(range(5), 2)]
    everything = pairwise_ms_ssim(images)
    np.testing.assert_allclose(everything, expected, atol=1e-6)
    subset = pairwise_ms_ssim(images, max_pairs=4, seed=3)
    assert subset.shape == (4,)
    matches = np.isclose(subset[:, None], np.asarray(expected)[None, :], atol=1e-6)
    assert matches.any(axis=1).all() and len(set(np.argmax(matches, axis=1))) == 4  # four distinct pairs
    assert pairwise_ms_ssim(images, max_pairs=100).shape == (10,)


# --- Control ---------------------------------------------------------------------------------------------------


def test_change_share_on_hand_made_arrays():
    twin = np.zeros((8, 8))
    mask = np.zeros((8, 8), bool)
    mask[2:4, 2:4] = True
    inside = twin.copy()
    inside[2, 3] = 0.5
    assert change_share(inside, twin, mask) == 1.0
    half = inside.copy()
    half[6, 6] = -0.5
    assert change_share(half, twin, mask) == pytest.approx(0.5)
    diagonal = twin.copy()
    diagonal[4, 4] = 1.0  # one pixel outside the mask's corner: Chebyshev distance 1
    assert change_share(diagonal, twin, mask) == 0.0
    assert change_share(diagonal, twin, mask, margin=1) == 1.0
    two_away = twin.copy()
    two_away[5, 3] = 1.0
    assert change_share(two_away, twin, mask, margin=1) == 0.0
    assert change_share(two_away, twin, mask, margin=2) == 1.0
    assert np.isnan(change_share(twin, twin, mask))


# --- AUROC and intervals ---------------------------------------------------------------------------------------


def _auroc_pairs(scores: np.ndarray, truth: np.ndarray) -> float:
    pos, neg = scores[truth], scores[~truth]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_matches_a_brute_force_pair_count_with_ties():
    rng = np.random.default_rng(16)
    truth = rng.random(120) < 0.4
    scores = np.round(rng.normal(size=120) + truth * 0.8, 1)  # rounding makes ties
    assert auroc(scores, truth) == pytest.approx(_auroc_pairs(scores, truth), abs=1e-12)
    assert auroc(scores, truth.astype(int)) == auroc(scores, truth)
    assert auroc(np.array([1.0, 2.0, 3.0]), np.array([0, 0, 1])) == 1.0
    assert auroc(np.array([1.0, 1.0]), np.array([0, 1])) == 0.5
    assert np.isnan(auroc(np.array([1.0, 2.0]), np.array([1, 1])))


def test_share_interval_is_wilsons_and_keeps_its_width_where_every_draw_is_a_hit():
    # Wilson's score interval for 0 of 10 at 95% reaches z^2 / (n + z^2) = 0.2775.
    assert share_interval(np.zeros(10, bool)) == pytest.approx((0.0, 0.2775), abs=1e-4)
    low, high = share_interval(np.ones(40, bool))
    assert high == 1.0 and low == pytest.approx(1 - 0.0876, abs=1e-3)  # a bootstrap would give (1, 1)
    low, high = share_interval(np.arange(280) < 272)
    assert low < 272 / 280 < high
    assert high - low < share_interval(np.arange(28) < 27)[1] - share_interval(np.arange(28) < 27)[0]
    assert np.isnan(share_interval(np.array([], bool))).all()


def test_intervals_contain_the_estimate_and_narrow_with_more_data():
    rng = np.random.default_rng(17)
    values = rng.normal(size=10_000)
    low, high = mean_interval(values)
    small_low, small_high = mean_interval(values[:100])
    assert low < values.mean() < high and small_low < values[:100].mean() < small_high
    assert small_high - small_low > 5 * (high - low)
    assert high - low == pytest.approx(2 * 1.96 / np.sqrt(10_000), rel=0.15)  # the normal-theory width
    with_nans = np.r_[values[:100], [np.nan] * 5]
    assert mean_interval(with_nans) == (small_low, small_high)
    assert mean_interval(np.array([np.nan])) == pytest.approx((np.nan, np.nan), nan_ok=True)

    truth = rng.random(4000) < 0.3
    scores = rng.normal(size=4000) + truth
    point = auroc(scores, truth)
    a_low, a_high = auroc_interval(scores, truth, rounds=200)
    s_low, s_high = auroc_interval(scores[:200], truth[:200], rounds=200)
    assert a_low < point < a_high and s_low < auroc(scores[:200], truth[:200]) < s_high
    assert s_high - s_low > 2 * (a_high - a_low)
    assert auroc_interval(scores, np.ones(4000, bool)) == pytest.approx((np.nan, np.nan), nan_ok=True)


def test_bootstrap_interval_resamples_each_size_and_drops_nan():
    seen = []

    def statistic(first, second):
        seen.append((len(first), len(second), first.max() < 3, second.max() < 7))
        return float(first.sum() + second.sum())

    low, high = bootstrap_interval(statistic, [3, 7], rounds=20)
    assert len(seen) == 20 and all(s == (3, 7, True, True) for s in seen)
    assert low <= high
    calls = iter(range(100))
    half_nan = bootstrap_interval(lambda idx: np.nan if next(calls) % 2 else 1.0, 5, rounds=10)
    assert half_nan == (1.0, 1.0)
    all_nan = bootstrap_interval(lambda idx: np.nan, 5, rounds=10)
    assert np.isnan(all_nan[0]) and np.isnan(all_nan[1])


def test_lung_detail_power_sees_ribs_and_vessels_that_a_blur_removes():
    from xreal.evaluate.metrics import lung_detail_power
    from xreal.phantom import renderer as phantom

    cases = phantom.generate(8, 64, seed=3, pathologies=[()] * 8)
    sharp = lung_detail_power(cases.images, cases.anatomy)
    smooth = lung_detail_power(ndimage.gaussian_filter(cases.images, (0, 1.5, 1.5)), cases.anatomy)
    assert sharp.shape == (8,) and np.all(smooth < 0.2 * sharp)
    # Only the lungs count: detail added outside them changes nothing.
    outside = cases.images.copy()
    lungs = (cases.anatomy == 1) | (cases.anatomy == 2)
    grown = ndimage.binary_dilation(lungs, iterations=4, structure=np.ones((1, 3, 3), bool))
    outside[~grown] += np.random.default_rng(0).normal(0, 0.2, (~grown).sum())
    assert np.allclose(lung_detail_power(outside, cases.anatomy), sharp)
    no_lungs = lung_detail_power(cases.images[:1], np.zeros_like(cases.anatomy[:1]))
    assert np.isnan(no_lungs[0])
    with pytest.raises(ValueError, match="both be"):
        lung_detail_power(cases.images[0], cases.anatomy[0])
