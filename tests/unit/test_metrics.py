import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from ray_ad import metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_metrics_match_scikit_learn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 500)
    scores = np.round(rng.normal(size=500) + labels, 1)  # rounding creates many ties
    got = metrics.image_metrics(scores, labels)
    precision, recall, _ = precision_recall_curve(labels, scores)
    f1 = np.max(2 * precision * recall / np.maximum(precision + recall, 1e-12))
    assert got["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert got["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert got["image_f1max"] == pytest.approx(f1, abs=1e-12)


def test_hand_worked_image_example():
    # Scores 0.1 (normal), 0.4 (anomalous), 0.35 (normal), 0.8 (anomalous): one swapped pair of four.
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    labels = np.array([0, 1, 0, 1])
    assert metrics.auroc(scores, labels) == pytest.approx(1.0)
    labels = np.array([0, 0, 1, 1])  # now 0.35 (anomalous) ranks below 0.4 (normal)
    assert metrics.auroc(scores, labels) == pytest.approx(0.75)
    # Ranked: 0.8 (TP), 0.4 (FP), 0.35 (TP), 0.1: AP = 0.5 * 1 + 0.5 * 2/3.
    assert metrics.average_precision(scores, labels) == pytest.approx(0.5 + 1 / 3)
    # Best F1 at threshold 0.35: P = 2/3, R = 1 -> 0.8.
    assert metrics.f1_max(scores, labels) == pytest.approx(0.8)


def test_single_class_is_an_error():
    with pytest.raises(ValueError, match="both normal and anomalous"):
        metrics.auroc(np.array([0.1, 0.2]), np.array([1, 1]))


def test_pixel_metrics_match_scikit_learn():
    rng = np.random.default_rng(3)
    masks = np.zeros((4, 16, 16), dtype=bool)
    masks[1, 4:8, 4:8] = True
    masks[2, 10:14, 2:5] = True
    maps = rng.random((4, 16, 16)).astype(np.float32) + masks * 0.5
    got = metrics.pixel_metrics(maps, masks)
    assert got["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)
    assert got["pixel_ap"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-9)


def test_au_pro_perfect_and_hand_worked():
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, 0:2, 0:2] = True  # region A, 4 pixels
    masks[1, 5:8, 5:8] = True  # region B, 9 pixels
    perfect = masks.astype(np.float64)
    assert metrics.au_pro(perfect, masks) == pytest.approx(1.0)
    # Region A fully above every normal pixel, region B fully below: PRO = 0.5 at every FPR <= 0.3.
    maps = np.full((2, 8, 8), 0.5)
    maps[0][masks[0]] = 1.0
    maps[1][masks[1]] = 0.0
    assert metrics.au_pro(maps, masks) == pytest.approx(0.5, abs=1e-6)


def test_au_pro_of_random_maps_is_near_the_random_value():
    # For uninformative maps, PRO(FPR) ~ FPR, so the normalised area up to 0.3 is ~0.15.
    rng = np.random.default_rng(0)
    masks = np.zeros((20, 32, 32), dtype=bool)
    masks[:, 8:20, 8:20] = True
    assert metrics.au_pro(rng.random((20, 32, 32)), masks) == pytest.approx(0.15, abs=0.02)
