"""Metrics on inputs with known answers: a set against itself, copies, shifted distributions."""

from __future__ import annotations

import math

import pytest
import torch

from fadscale.core.metrics import (accuracy_from_confusion, confusion_matrix, frechet_distance, frechet_from_stats,
                              gaussian_stats, kernel_distance, orientation_coherence, precision_recall, random_pairs,
                              ssim_diversity, wilson_interval)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _features(n=400, d=8, shift=0.0, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=torch.float64) * scale + shift


def test_frechet_of_a_set_with_itself_is_zero():
    x = _features()
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_frechet_grows_with_the_difference_and_matches_the_closed_form():
    x = _features(seed=0)
    near, far = _features(seed=1), _features(seed=1, shift=2.0)
    assert frechet_distance(x, near) < frechet_distance(x, far)
    # Same covariance, different means: the distance is exactly ||mu_a - mu_b||^2.
    mu, sigma = gaussian_stats(x)
    assert frechet_from_stats(mu, sigma, mu + 3.0, sigma) == pytest.approx(9.0 * x.shape[1], rel=1e-9)
    # Isotropic Gaussians: d (s_a - s_b)^2 for standard deviations s_a, s_b.
    eye = torch.eye(4, dtype=torch.float64)
    assert frechet_from_stats(torch.zeros(4), eye, torch.zeros(4), 4 * eye) == pytest.approx(4.0, rel=1e-9)


def test_frechet_agrees_with_torchmetrics():
    from torchmetrics.image.fid import _compute_fid

    a, b = _features(seed=2), _features(seed=3, shift=0.5, scale=1.5)
    ours = frechet_distance(a, b)
    theirs = float(_compute_fid(*gaussian_stats(a), *gaussian_stats(b)))
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_frechet_with_fewer_samples_than_dimensions_is_finite():
    a, b = _features(n=5, d=32, seed=4), _features(n=6, d=32, seed=5)
    value = frechet_distance(a, b)
    assert math.isfinite(value) and value > 0


def test_kid_of_a_set_with_itself_is_near_zero_and_grows_with_difference():
    x = _features(n=600, seed=6)
    same, _ = kernel_distance(x, x, subsets=20, subset_size=300, seed=0)
    near, _ = kernel_distance(x, _features(n=600, seed=7), subsets=20, subset_size=300, seed=0)
    shifted, _ = kernel_distance(x, _features(n=600, seed=7, shift=0.3), subsets=20, subset_size=300, seed=0)
    far, _ = kernel_distance(x, _features(n=600, seed=7, shift=1.0), subsets=20, subset_size=300, seed=0)
    # Unbiased MMD^2: ~0 (either sign, O(1/n)) for the same distribution, on a scale where a 0.3-sigma
    # shift already gives ~0.3 and a 1-sigma shift ~8.
    assert abs(same) < 0.05 and abs(near) < 0.05
    assert 0.1 < shifted < far


def test_kid_is_deterministic_for_a_seed():
    x, y = _features(seed=8), _features(seed=9, shift=0.3)
    assert kernel_distance(x, y, subsets=5, subset_size=50, seed=1) == kernel_distance(x, y, subsets=5, subset_size=50, seed=1)


def test_precision_recall_of_a_set_with_itself_is_one():
    x = _features(n=100, seed=10)
    result = precision_recall(x, x, k=3)
    assert result["precision"] == 1.0 and result["recall"] == 1.0 and result["k"] == 3


def test_precision_recall_of_disjoint_sets_is_zero_and_partial_overlap_in_between():
    real = _features(n=100, seed=11)
    result = precision_recall(real, _features(n=100, seed=12, shift=50.0))
    assert result["precision"] == 0.0 and result["recall"] == 0.0
    # Fakes covering only part of the real set (mode dropping): full precision, low recall.
    plane = _features(n=200, d=2, seed=13)
    partial = precision_recall(plane, plane[plane[:, 0] > 0.5])
    assert partial["precision"] == 1.0 and partial["recall"] < 0.6


def test_ssim_diversity_of_copies_is_zero_and_of_noise_is_high():
    gen = torch.Generator().manual_seed(0)
    tile = torch.randint(0, 256, (1, 1, 32, 32), generator=gen, dtype=torch.uint8)
    copies = tile.expand(6, -1, -1, -1).clone()
    assert ssim_diversity(copies, pairs=10)["diversity"] == pytest.approx(0.0, abs=1e-9)
    noise = torch.randint(0, 256, (6, 1, 32, 32), generator=gen, dtype=torch.uint8)
    assert ssim_diversity(noise, pairs=10)["diversity"] > 0.8
    # Small tiles (window shrunk) and RGB work too.
    small = torch.randint(0, 256, (4, 3, 8, 8), generator=gen, dtype=torch.uint8)
    assert 0 < ssim_diversity(small, pairs=5)["diversity"] < 2


def test_random_pairs_are_distinct_and_seeded():
    pairs = random_pairs(10, 20, seed=3)
    assert pairs.shape == (20, 2) and bool((pairs[:, 0] != pairs[:, 1]).all())
    assert torch.equal(pairs, random_pairs(10, 20, seed=3))
    assert len(random_pairs(4, 100)) == 6  # every pair once when there are few


def test_confusion_and_accuracy():
    true = torch.tensor([0, 0, 1, 1, 2])
    pred = torch.tensor([0, 1, 1, 1, 0])
    confusion = confusion_matrix(true, pred, 3)
    assert confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    acc = accuracy_from_confusion(confusion, ["a", "b", "c"])
    assert acc["overall"] == pytest.approx(0.6) and acc["per_class"] == {"a": 0.5, "b": 1.0, "c": 0.0}
    assert acc["interval95"] == pytest.approx(list(wilson_interval(3, 5)))


def test_wilson_interval_covers_the_true_accuracy_about_95_percent_of_the_time():
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)  # the textbook case
    low, high = wilson_interval(0, 20)
    assert low == pytest.approx(0.0, abs=1e-12) and 0.1 < high < 0.2  # inside [0, 1] at the edge
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    # 4,000 draws of 256 tiles from a source the classifier gets right 88% of the time (the real-tile demo's case).
    torch.manual_seed(0)
    rights = torch.distributions.Binomial(256, torch.tensor(0.88)).sample((4000,))
    covered = sum(low <= 0.88 <= high for low, high in (wilson_interval(int(r), 256) for r in rights))
    assert 0.93 < covered / 4000 < 0.97


def test_orientation_coherence_is_high_for_parallel_stripes_at_any_angle_and_low_for_noise():
    y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    for angle in (0.0, 0.4, 1.1, 2.0):
        along = x * math.cos(angle) + y * math.sin(angle)
        stripes = (127.5 + 100 * torch.sin(along * 2 * math.pi / 4)).round().to(torch.uint8)
        assert orientation_coherence(stripes[None, None]) > 0.9, angle
    noise = torch.randint(0, 256, (16, 1, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert orientation_coherence(noise) < 0.15
    # Crossed stripes have edges in two directions: no single orientation.
    crossed = torch.sin(x * 2 * math.pi / 4) + torch.sin(y * 2 * math.pi / 4)
    assert orientation_coherence(crossed[None, None]) < 0.05
    # A flat tile has no edges: 0, not a division by zero; uint8 and float in [0, 1] agree.
    assert orientation_coherence(torch.full((2, 3, 8, 8), 7, dtype=torch.uint8)) == 0.0
    assert orientation_coherence(noise.float() / 255) == pytest.approx(orientation_coherence(noise), abs=1e-9)
