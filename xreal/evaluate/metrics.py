"""The figures of ``xreal evaluate``: fidelity, diversity, control and classifier metrics, with intervals.

Pure functions of arrays (numpy, scipy, torch on CPU); no file I/O.

- Fidelity: :class:`FeatureStats` (streaming mean and covariance), :func:`frechet_distance`,
  :func:`frechet_interval`, :func:`kid` (Binkowski et al. 2018, as torch-fidelity computes it) and
  :func:`prdc` (precision, recall, density, coverage; Naeem et al. 2020, as the ``prdc`` package).
- Diversity: :func:`ms_ssim` and :func:`pairwise_ms_ssim`.
- Control: :func:`change_share` (how much of an image's change from its healthy twin lies in the mask).
- Classifiers: :func:`auroc`, :func:`auroc_interval`.
- Intervals: :func:`bootstrap_interval` (percentile bootstrap of any statistic), :func:`mean_interval`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.stats import binomtest, rankdata

from xreal.core.labels import Anatomy

# The standard MS-SSIM weights of Wang, Simoncelli & Bovik (2003), finest scale first.
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5

_STATS_BLOCK = 8192  # rows converted to float64 at a time by FeatureStats
_EXACT_BOOTSTRAP_FLOPS = 1.2e10  # above n * d^2 of this, frechet_interval resamples blocks of points
_BLOCK_MOMENT_BYTES = 256e6  # memory for the per-block second moments of one set
_THREADED_MS_SSIM = 256  # image pairs from which ms_ssim lets torch use several threads


def _features(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array of features [N, D], got shape {x.shape}")
    return x


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level!r}")


def _percentile_interval(values: Sequence[float] | np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval of the finite values; (nan, nan) when there are none."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


# --- Fidelity --------------------------------------------------------------------------------------------------


class FeatureStats:
    """Streaming mean and covariance of feature vectors in float64 (Chan et al.'s pairwise update).

    Feed batches ``[B, D]`` to :meth:`update`; features never need to be held at once.
    """

    def __init__(self, dim: int | None = None) -> None:
        self.dim = dim
        self.count = 0
        self._mean: np.ndarray | None = None
        self._scatter: np.ndarray | None = None  # sum of outer products of deviations from the mean

    def update(self, features: np.ndarray) -> None:
        """Add a batch of features ``[B, D]`` (any float dtype; converted to float64 a block at a time)."""
        x = _features(features, "features")
        if self.dim is None:
            self.dim = int(x.shape[1])
        elif x.shape[1] != self.dim:
            raise ValueError(f"features have {x.shape[1]} dimensions, these statistics {self.dim}")
        for lo in range(0, x.shape[0], _STATS_BLOCK):
            block = np.asarray(x[lo : lo + _STATS_BLOCK], dtype=np.float64)
            if not np.isfinite(block).all():
                raise ValueError("features contain NaN or infinite values")
            size = block.shape[0]
            block_mean = block.mean(axis=0)
            centred = block - block_mean
            scatter = centred.T @ centred
            if self.count == 0 or self._mean is None or self._scatter is None:
                self._mean, self._scatter = block_mean, scatter
            else:
                total = self.count + size
                delta = block_mean - self._mean
                self._mean = self._mean + delta * (size / total)
                self._scatter = self._scatter + scatter + np.outer(delta, delta) * (self.count * size / total)
            self.count += size

    @property
    def mean(self) -> np.ndarray:
        """Mean feature vector ``[D]`` (float64)."""
        if self._mean is None:
            raise ValueError("no features yet")
        return self._mean.copy()

    def covariance(self) -> np.ndarray:
        """Unbiased (n - 1) covariance ``[D, D]`` (float64, symmetric)."""
        if self._scatter is None or self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        cov = self._scatter / (self.count - 1)
        return (cov + cov.T) / 2.0


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Run torch's LAPACK calls on one thread (torch's thread count is process-wide: restored on exit).

    A multi-threaded symmetric eigensolver slows down a hundredfold when the cores are busy with other work (30 s
    instead of 0.15 s at D = 1024 on a loaded 2-core machine), and gains little when they are idle.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def trace_sqrt_product(cov1: np.ndarray, cov2: np.ndarray) -> float:
    """``Tr(sqrt(C1 C2))`` for covariance matrices, without complex arithmetic.

    The eigenvalues of ``C1 C2`` are those of the symmetric ``F^T C2 F`` for any ``F F^T = C1`` (the Cholesky
    factor, or ``V sqrt(W)`` from an eigendecomposition when ``C1`` is singular); they are real and non-negative, so
    the trace is the sum of their square roots (tiny negative rounding clipped). float64 throughout.
    """
    c1 = torch.from_numpy(np.ascontiguousarray(cov1, dtype=np.float64))
    c2 = torch.from_numpy(np.ascontiguousarray(cov2, dtype=np.float64))
    with _one_torch_thread():
        factor, info = torch.linalg.cholesky_ex(c1)
        if int(info) != 0 or not bool(torch.isfinite(factor).all()):
            values, vectors = torch.linalg.eigh(c1)
            factor = vectors * values.clamp(min=0.0).sqrt()
        inner = factor.T @ c2 @ factor
        values = torch.linalg.eigvalsh((inner + inner.T) / 2.0)
    return float(values.clamp(min=0.0).sqrt().sum())


def frechet_distance(mean1: np.ndarray, cov1: np.ndarray, mean2: np.ndarray, cov2: np.ndarray) -> float:
    """Fréchet distance ``||m1 - m2||^2 + Tr(C1 + C2 - 2 sqrt(C1 C2))`` of two Gaussians (never negative)."""
    m1 = np.atleast_1d(np.asarray(mean1, dtype=np.float64))
    m2 = np.atleast_1d(np.asarray(mean2, dtype=np.float64))
    c1 = np.atleast_2d(np.asarray(cov1, dtype=np.float64))
    c2 = np.atleast_2d(np.asarray(cov2, dtype=np.float64))
    d = m1.shape[0]
    if m1.shape != (d,) or m2.shape != (d,) or c1.shape != (d, d) or c2.shape != (d, d):
        raise ValueError(f"shapes do not match: means {m1.shape}, {m2.shape}, covariances {c1.shape}, {c2.shape}")
    if not all(np.isfinite(x).all() for x in (m1, m2, c1, c2)):
        raise ValueError("means and covariances must be finite")
    c1, c2 = (c1 + c1.T) / 2.0, (c2 + c2.T) / 2.0
    diff = m1 - m2
    distance = float(diff @ diff) + float(np.trace(c1) + np.trace(c2)) - 2.0 * trace_sqrt_product(c1, c2)
    return max(distance, 0.0)


def frechet_distance_of(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to feature sets ``a [N, D]`` and ``b [M, D]``."""
    stats = []
    for name, x in (("a", a), ("b", b)):
        s = FeatureStats()
        s.update(_features(x, name))
        stats.append(s)
    return frechet_distance(stats[0].mean, stats[0].covariance(), stats[1].mean, stats[1].covariance())


class _MomentResampler:
    """Draws the mean and covariance of bootstrap resamples of one feature set, cheaply.

    Small sets (``n * d^2`` up to ~1.2e10) are resampled point by point: the set is centred once and a round costs
    one weighted ``X^T W X`` over the points drawn at least once. Larger sets are split once into random blocks
    (as many as fit 256 MB of second moments, 16 to 256) whose sums and second moments are precomputed; a round
    resamples blocks with replacement, costing ``blocks * d^2``. Because the blocks are random, they are i.i.d. and
    the block bootstrap has the same first-order variance as the point bootstrap; it is only coarser.
    """

    def __init__(self, x: np.ndarray, rng: np.random.Generator) -> None:
        stats = FeatureStats()
        stats.update(x)
        if stats.count < 2:
            raise ValueError("a bootstrap of a covariance needs at least 2 feature vectors per set")
        n, d = x.shape
        self.n = n
        self.centre = stats.mean
        self.exact = n * d * d <= _EXACT_BOOTSTRAP_FLOPS
        if self.exact:
            self.centred = torch.from_numpy(np.asarray(x, dtype=np.float64) - self.centre)
            return
        blocks = int(np.clip(_BLOCK_MOMENT_BYTES // (8 * d * d), 16, 256))
        order = rng.permutation(n)
        self.sizes = np.empty(blocks, np.float64)
        self.sums = np.empty((blocks, d), np.float64)
        self.moments = np.empty((blocks, d, d), np.float64)
        for b, idx in enumerate(np.array_split(order, blocks)):
            part = np.asarray(x[np.sort(idx)], dtype=np.float64) - self.centre
            self.sizes[b], self.sums[b], self.moments[b] = len(idx), part.sum(axis=0), part.T @ part

    def draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased covariance of one resample."""
        if self.exact:
            counts = np.bincount(rng.integers(0, self.n, self.n), minlength=self.n)
            drawn = np.flatnonzero(counts)
            weights = torch.from_numpy(counts[drawn].astype(np.float64))
            rows = self.centred[torch.from_numpy(drawn)]
            total = float(self.n)
            sums = (weights @ rows).numpy()
            scaled = rows * weights.sqrt()[:, None]
            moment = (scaled.T @ scaled).numpy()
        else:
            weights = rng.multinomial(len(self.sizes), np.full(len(self.sizes), 1.0 / len(self.sizes)))
            weights = weights.astype(np.float64)
            total = float(weights @ self.sizes)
            sums = weights @ self.sums
            moment = np.tensordot(weights, self.moments, axes=1)
        cov = (moment - np.outer(sums, sums) / total) / (total - 1.0)
        return self.centre + sums / total, (cov + cov.T) / 2.0


def frechet_bootstrap(a: np.ndarray, b: np.ndarray, rounds: int = 50, seed: int = 0) -> np.ndarray:
    """Fréchet distances ``[rounds]`` between bootstrap resamples of feature sets ``a`` and ``b`` (both resampled).

    Per-set work is done once (see :class:`_MomentResampler`); a round at D = 1024 and 10,000 points per set costs
    well under a second on one core (two weighted ``X^T W X``, a Cholesky factor and a symmetric eigensolve).
    """
    a, b = _features(a, "a"), _features(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} and {b.shape[1]}")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    rng = np.random.default_rng(seed)
    with _one_torch_thread():  # small torch ops on busy cores are far slower threaded, large ones barely faster
        first, second = _MomentResampler(a, rng), _MomentResampler(b, rng)
        return np.array([frechet_distance(*first.draw(rng), *second.draw(rng)) for _ in range(rounds)])


FRECHET_INTERVALS = ("centred", "percentile", "basic")


def frechet_interval(
    a: np.ndarray, b: np.ndarray, rounds: int = 50, level: float = 0.95, seed: int = 0, *, method: str = "centred"
) -> tuple[float, float]:
    """Bootstrap interval of the Fréchet distance between feature sets ``a`` and ``b``, resampling both.

    A Fréchet distance from samples is biased upwards (by roughly ``d^2 / n``: two 10,000-point samples of
    1024-d Gaussians 10 apart read about 68), and a resample with replacement adds that bias once more, so the plain
    percentile interval of the resampled distances sits above the point estimate, often entirely. Hence methods:

    - ``"centred"`` (default): the percentile interval of the resampled distances shifted by the bootstrap's bias
      estimate (their mean minus the point estimate). It brackets the point estimate and says how much the figure
      would move with fresh samples of the same sizes: the interval to compare generators (and the real-vs-real
      baseline) measured at equal sizes.
    - ``"percentile"``: the plain percentile interval.
    - ``"basic"``: ``2 * estimate - quantiles``, an interval for the population distance, corrected for the bias
      to first order (clipped at 0); it lies below the point estimate when the bias is large.
    """
    _check_level(level)
    if method not in FRECHET_INTERVALS:
        raise ValueError(f"method must be one of {FRECHET_INTERVALS}, got {method!r}")
    values = frechet_bootstrap(a, b, rounds, seed)
    if method == "percentile":
        return _percentile_interval(values, level)
    estimate = frechet_distance_of(a, b)
    if method == "centred":
        low, high = _percentile_interval(values - (values.mean() - estimate), level)
        return max(low, 0.0), high
    low, high = _percentile_interval(values, level)
    return max(2.0 * estimate - high, 0.0), max(2.0 * estimate - low, 0.0)


def frechet_difference(
    a: np.ndarray, b: np.ndarray, real: np.ndarray, rounds: int = 200, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Fréchet distance of ``a`` to ``real`` minus that of ``b``, with a paired bootstrap interval.

    ``a`` and ``b`` are paired row by row (two models' images of the same requests): each round resamples the
    requests once for both and ``real`` once, so what the two sets share (the requests, the real sample and most of
    the estimator's bias) cancels. Returns (difference, low, high); below 0, ``a`` is closer to ``real``.
    """
    _check_level(level)
    a, b, real = _features(a, "a"), _features(b, "b"), _features(real, "real")
    if a.shape != b.shape:
        raise ValueError(f"a and b must be paired row by row: shapes {a.shape} and {b.shape}")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(rounds):
        pick, real_pick = rng.integers(0, len(a), len(a)), rng.integers(0, len(real), len(real))
        values.append(frechet_distance_of(a[pick], real[real_pick]) - frechet_distance_of(b[pick], real[real_pick]))
    low, high = _percentile_interval(values, level)
    return frechet_distance_of(a, real) - frechet_distance_of(b, real), low, high


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of two samples with the polynomial kernel ``(x.y / d + 1)^3`` (float64)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    m, n, d = x.shape[0], y.shape[0], x.shape[1]
    if m < 2 or n < 2:
        raise ValueError("the unbiased MMD needs at least 2 points per sample")

    def kernel_sum(u: np.ndarray, v: np.ndarray, skip_diagonal: bool) -> float:
        k = u @ v.T
        k /= d
        k += 1.0
        cube = k * k
        cube *= k
        total = float(cube.sum())
        return total - float(np.trace(cube)) if skip_diagonal else total

    within_x = kernel_sum(x, x, True) / (m * (m - 1))
    within_y = kernel_sum(y, y, True) / (n * (n - 1))
    return float(within_x + within_y - 2.0 * kernel_sum(x, y, False) / (m * n))


def kid(
    a: np.ndarray, b: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance: mean and standard deviation of the unbiased MMD^2 over random subsets.

    Each of ``subsets`` rounds draws ``subset_size`` points (capped at the smaller set) without replacement
    from each set and computes :func:`mmd2_unbiased`, as Binkowski et al. (2018) and torch-fidelity do.
    """
    a, b = _features(a, "a"), _features(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} and {b.shape[1]}")
    size = min(subset_size, a.shape[0], b.shape[0])
    if size < 2:
        raise ValueError("KID needs at least 2 feature vectors per set")
    if subsets < 1:
        raise ValueError(f"subsets must be at least 1, got {subsets}")
    rng = np.random.default_rng(seed)
    values = np.empty(subsets, np.float64)
    for s in range(subsets):
        x = a[rng.choice(a.shape[0], size, replace=False)]
        y = b[rng.choice(b.shape[0], size, replace=False)]
        values[s] = mmd2_unbiased(x, y)
    return float(values.mean()), float(values.std())


def _squared_distances(x: np.ndarray, y: np.ndarray, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances ``[len(x), len(y)]`` from precomputed squared norms (clipped at 0)."""
    d2 = x @ y.T  # one [len(x), len(y)] buffer, updated in place
    d2 *= -2.0
    d2 += xx[:, None]
    d2 += yy[None, :]
    return np.maximum(d2, 0.0, out=d2)


def _kth_neighbour_sq(x: np.ndarray, xx: np.ndarray, k: int, chunk: int) -> np.ndarray:
    """Squared distance of every row to its k-th nearest other row (the (k+1)-th smallest, self included)."""
    radii = np.empty(x.shape[0], np.float64)
    for lo in range(0, x.shape[0], chunk):
        d2 = _squared_distances(x[lo : lo + chunk], x, xx[lo : lo + chunk], xx)
        d2.partition(k, axis=1)  # in place: no second chunk-sized matrix
        radii[lo : lo + chunk] = d2[:, k]
        del d2  # before the next chunk's matrix exists
    return radii


def prdc(
    real: np.ndarray,
    fake: np.ndarray,
    k: int = 5,
    chunk: int = 2048,
    max_points: int | None = 10000,
    seed: int = 0,
) -> dict[str, float]:
    """Precision, recall, density and coverage of ``fake`` against ``real`` (Naeem et al. 2020).

    The definitions are the ``prdc`` package's, with Euclidean distances and strict comparisons: the radius of a
    point is the distance to its k-th nearest neighbour in its own set; precision is the share of fake points
    inside some real ball, recall the share of real points inside some fake ball, density the mean number of real
    balls holding a fake point divided by k, coverage the share of real balls holding at least one fake point.

    A set larger than ``max_points`` is replaced by a random subset of ``max_points`` points (drawn without
    replacement with ``seed``; ``None`` keeps every point). Squared distances are computed ``chunk`` rows at a time
    in float64 after centring both sets on the real mean, as ``-2 x.y + |x|^2 + |y|^2`` (sklearn's order, so the
    ``prdc`` package's), so memory stays at one ``chunk x max(N, M)`` matrix.
    """
    real, fake = _features(real, "real"), _features(fake, "fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: {real.shape[1]} and {fake.shape[1]}")
    if k < 1 or chunk < 1:
        raise ValueError(f"k and chunk must be at least 1, got {k} and {chunk}")
    rng = np.random.default_rng(seed)
    if max_points is not None:
        if real.shape[0] > max_points:
            real = real[np.sort(rng.choice(real.shape[0], max_points, replace=False))]
        if fake.shape[0] > max_points:
            fake = fake[np.sort(rng.choice(fake.shape[0], max_points, replace=False))]
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"PRDC with k={k} needs more than {k} points per set")
    centre = np.asarray(real, dtype=np.float64).mean(axis=0)
    real = np.asarray(real, dtype=np.float64) - centre
    fake = np.asarray(fake, dtype=np.float64) - centre
    rr = np.einsum("ij,ij->i", real, real)
    ff = np.einsum("ij,ij->i", fake, fake)
    real_radii = _kth_neighbour_sq(real, rr, k, chunk)
    fake_radii = _kth_neighbour_sq(fake, ff, k, chunk)

    in_real_ball = np.empty(fake.shape[0], bool)
    real_balls = np.empty(fake.shape[0], np.int64)
    in_fake_ball = np.zeros(real.shape[0], bool)
    nearest_fake = np.full(real.shape[0], np.inf)
    for lo in range(0, fake.shape[0], chunk):
        d2 = _squared_distances(fake[lo : lo + chunk], real, ff[lo : lo + chunk], rr)  # [c, N]
        inside = d2 < real_radii[None, :]
        in_real_ball[lo : lo + chunk] = inside.any(axis=1)
        real_balls[lo : lo + chunk] = inside.sum(axis=1)
        in_fake_ball |= (d2 < fake_radii[lo : lo + chunk, None]).any(axis=0)
        np.minimum(nearest_fake, d2.min(axis=0), out=nearest_fake)
        del d2, inside
    return {
        "precision": float(in_real_ball.mean()),
        "recall": float(in_fake_ball.mean()),
        "density": float(real_balls.mean() / k),
        "coverage": float((nearest_fake < real_radii).mean()),
    }


# --- Diversity -------------------------------------------------------------------------------------------------


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    window = torch.exp(-(offsets**2) / (2.0 * sigma**2))
    return window / window.sum()


def max_ms_ssim_scales(height: int, width: int) -> int:
    """Most MS-SSIM scales (up to 5) for which every scale's image is at least as large as the 11-px window."""
    scales = 0
    side = min(height, width)
    while scales < len(MS_SSIM_WEIGHTS) and side >= SSIM_WINDOW:
        scales += 1
        side //= 2
    return scales


def _ssim_parts(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor, c1: float, c2: float):
    """Mean SSIM and mean contrast-structure term of image pairs ``[B, 1, H, W]`` (valid Gaussian filtering)."""
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    size = window.numel()
    filtered = F.conv2d(stack, window.view(1, 1, 1, size).expand(5, 1, 1, size), groups=5)
    filtered = F.conv2d(filtered, window.view(1, 1, size, 1).expand(5, 1, size, 1), groups=5)
    mu_x, mu_y, xx, yy, xy = filtered.unbind(dim=1)
    var_x, var_y, cov = xx - mu_x * mu_x, yy - mu_y * mu_y, xy - mu_x * mu_y
    cs = (2.0 * cov + c2) / (var_x + var_y + c2)
    luminance = (2.0 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
    return (luminance * cs).mean(dim=(1, 2)), cs.mean(dim=(1, 2))


def ms_ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0, scales: int | None = None) -> np.ndarray:
    """MS-SSIM of image pairs ``a[i], b[i]`` (``[B, H, W]``, values in ``[0, data_range]``) -> ``[B]``.

    Wang et al.'s definition as pytorch-msssim computes it: an 11-px Gaussian window (sigma 1.5, valid filtering),
    K1 = 0.01, K2 = 0.03, 2x2 average pooling between scales, the contrast-structure term at every scale but the
    last and the full SSIM at the last, each clipped at 0 and raised to the standard weights (0.0448, 0.2856,
    0.3001, 0.2363, 0.1333) cut to the scales used and renormalised to sum to 1. ``scales=None`` uses the most that
    fit (every scale at least 11 px: 5 from 176 px, 3 at 64 px); ``scales=1`` is plain SSIM clipped at 0.
    Computed in float32 with torch, in batches.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"ms_ssim needs two image batches [B, H, W] of one shape, got {a.shape} and {b.shape}")
    fit = max_ms_ssim_scales(a.shape[1], a.shape[2])
    if scales is None:
        scales = fit
    if fit == 0 or not 1 <= scales <= fit:
        raise ValueError(f"{a.shape[1]}x{a.shape[2]} images allow 1 to {fit} MS-SSIM scales, got {scales}")
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=torch.float32)
    weights = weights / weights.sum()
    window = _gaussian_window().float()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    per_batch = max(1, (1 << 22) // (a.shape[1] * a.shape[2]))
    out = np.empty(a.shape[0], np.float64)
    # threads pay off on large batches only; on a few images their start-up dominates, badly so on busy cores
    threads = nullcontext() if a.shape[0] >= _THREADED_MS_SSIM else _one_torch_thread()
    with torch.no_grad(), threads:
        for lo in range(0, a.shape[0], per_batch):
            x = torch.from_numpy(np.ascontiguousarray(a[lo : lo + per_batch], dtype=np.float32))[:, None]
            y = torch.from_numpy(np.ascontiguousarray(b[lo : lo + per_batch], dtype=np.float32))[:, None]
            value = torch.ones(x.shape[0])
            for scale in range(scales):
                ssim, cs = _ssim_parts(x, y, window, c1, c2)
                term = ssim if scale == scales - 1 else cs
                value = value * torch.relu(term) ** weights[scale]
                if scale < scales - 1:
                    x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
            out[lo : lo + per_batch] = value.double().numpy()
    return out


def _unrank_pairs(linear: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j), i < j, at positions ``linear`` of the row-major upper triangle of an ``n x n`` matrix."""
    rows = np.arange(n, dtype=np.int64)
    starts = rows * n - rows * (rows + 1) // 2  # pairs before row i
    i = np.searchsorted(starts, linear, side="right") - 1
    return i, linear - starts[i] + i + 1


def pairwise_ms_ssim(images: np.ndarray, max_pairs: int | None = None, seed: int = 0) -> np.ndarray:
    """MS-SSIM of every pair ``i < j`` of images ``[N, H, W]`` (row-major order), see :func:`ms_ssim`.

    With ``max_pairs`` and more pairs than that, a random subset of ``max_pairs`` distinct pairs (drawn with
    ``seed``, kept in row-major order). Lower means more diverse.
    """
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"images must be [N, H, W], got shape {images.shape}")
    n = images.shape[0]
    total = n * (n - 1) // 2
    if max_pairs is not None and max_pairs < total:
        linear = np.sort(np.random.default_rng(seed).choice(total, size=max_pairs, replace=False))
    else:
        linear = np.arange(total, dtype=np.int64)
    out = np.empty(linear.shape[0], np.float64)
    step = max(1, (1 << 22) // (images.shape[1] * images.shape[2]))
    for lo in range(0, linear.shape[0], step):
        i, j = _unrank_pairs(linear[lo : lo + step], n)
        out[lo : lo + step] = ms_ssim(images[i], images[j])
    return out


# --- Control ---------------------------------------------------------------------------------------------------


def change_share(image: np.ndarray, twin: np.ndarray, mask: np.ndarray, margin: int = 0) -> float:
    """Share of ``sum |image - twin|`` inside ``mask`` grown by ``margin`` pixels (Chebyshev distance).

    ``mask`` is a boolean ``[H, W]``; the margin is a binary dilation with a ``(2 margin + 1)`` square. NaN when
    the image equals its twin (no change at all).
    """
    image = np.asarray(image, dtype=np.float64)
    twin = np.asarray(twin, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if image.shape != twin.shape or image.shape != mask.shape:
        raise ValueError(f"image, twin and mask shapes differ: {image.shape}, {twin.shape}, {mask.shape}")
    if margin < 0:
        raise ValueError(f"margin must be non-negative, got {margin}")
    if margin > 0:
        mask = ndimage.binary_dilation(mask, structure=np.ones((2 * margin + 1,) * mask.ndim, bool))
    change = np.abs(image - twin)
    total = float(change.sum())
    if total == 0.0:
        return float("nan")
    return float(change[mask].sum() / total)


def lung_detail_power(images: np.ndarray, anatomy: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Per image, the mean square of the image minus its Gaussian blur (``sigma`` pixels) over the lungs.

    ``images`` are ``[N, H, W]`` in [0, 1] and ``anatomy`` their label maps (Anatomy ids). The high-pass keeps
    what a smooth image lacks: rib edges, vessels and noise. NaN for an image without lungs.
    """
    images = np.asarray(images, dtype=np.float64)
    anatomy = np.asarray(anatomy)
    if images.ndim != 3 or images.shape != anatomy.shape:
        raise ValueError(f"images and label maps must both be [N, H, W], got {images.shape} and {anatomy.shape}")
    detail = images - ndimage.gaussian_filter(images, (0.0, sigma, sigma), mode="nearest")
    lungs = (anatomy == Anatomy.RIGHT_LUNG) | (anatomy == Anatomy.LEFT_LUNG)
    area = lungs.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(area > 0, (detail**2 * lungs).sum(axis=(1, 2)) / area, np.nan)


# --- Classifiers and intervals ---------------------------------------------------------------------------------


def _scores(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    return scores


def _binary_truth(truth: np.ndarray, length: int) -> np.ndarray:
    truth = np.asarray(truth)
    if truth.shape != (length,):
        raise ValueError(f"truth must be 1-D and as long as the scores ({length}), got shape {truth.shape}")
    if truth.dtype != bool and not np.isin(truth, (0, 1)).all():
        raise ValueError("truth must be boolean or 0/1")
    return truth.astype(bool)


def auroc(scores: np.ndarray, truth: np.ndarray) -> float:
    """Area under the ROC curve by ranks (Mann-Whitney U; ties count 1/2). NaN when a class is absent."""
    scores = _scores(scores)
    truth = _binary_truth(truth, scores.shape[0])
    positives = int(truth.sum())
    negatives = truth.shape[0] - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = rankdata(scores)
    u = ranks[truth].sum() - positives * (positives + 1) / 2.0
    return float(u / (positives * negatives))


def bootstrap_interval(
    statistic: Callable[..., float],
    sizes: int | Sequence[int],
    rounds: int = 200,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic``.

    Every round calls ``statistic(*indices)`` with one array of indices per entry of ``sizes``, each drawn with
    replacement from ``range(size)`` (so several samples, e.g. two feature sets or two classes, are resampled
    independently). NaN results are dropped; ``(nan, nan)`` when all are NaN.
    """
    _check_level(level)
    sizes = [sizes] if isinstance(sizes, int | np.integer) else list(sizes)
    if any(int(s) < 1 for s in sizes):
        raise ValueError(f"every size must be at least 1, got {sizes}")
    rng = np.random.default_rng(seed)
    values = [float(statistic(*(rng.integers(0, int(s), int(s)) for s in sizes))) for _ in range(rounds)]
    return _percentile_interval(values, level)


def mean_interval(values: np.ndarray, rounds: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (NaNs ignored; (nan, nan) when none is left)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[~np.isnan(values)]
    if values.size == 0:
        _check_level(level)
        return float("nan"), float("nan")
    return bootstrap_interval(lambda idx: float(values[idx].mean()), values.size, rounds, level, seed)


def share_interval(hits: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of the share of true values in ``hits``: unlike a bootstrap it does not collapse to a
    point when every draw (or none) is a hit, which is where detection rates sit. (nan, nan) when empty."""
    _check_level(level)
    hits = np.asarray(hits, dtype=bool).ravel()
    if hits.size == 0:
        return float("nan"), float("nan")
    interval = binomtest(int(hits.sum()), hits.size).proportion_ci(confidence_level=level, method="wilson")
    return float(interval.low), float(interval.high)


def auroc_interval(
    scores: np.ndarray, truth: np.ndarray, rounds: int = 500, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`auroc`, resampling positives and negatives separately.

    Stratifying keeps both classes in every round; (nan, nan) when a class is absent.
    """
    scores = _scores(scores)
    truth = _binary_truth(truth, scores.shape[0])
    pos, neg = scores[truth], scores[~truth]
    if pos.size == 0 or neg.size == 0:
        _check_level(level)
        return float("nan"), float("nan")
    labels = np.r_[np.ones(pos.size, bool), np.zeros(neg.size, bool)]

    def resampled(ip: np.ndarray, ineg: np.ndarray) -> float:
        return auroc(np.r_[pos[ip], neg[ineg]], labels)

    return bootstrap_interval(resampled, (pos.size, neg.size), rounds, level, seed)
