"""The status per image, on features whose answer is known: points far from every training
class are `unknown`, low-confidence answers `unsure`, and the thresholds behave as users
read them (a higher target never answers more)."""

from __future__ import annotations

import numpy as np
import pytest

from imgclf.model import selective as sel


def _clusters(rng, n_per_class=40, dim=24, classes=3, spread=0.3):
    """Non-negative features (as after ReLU and pooling) in one cluster per class."""
    centres = rng.uniform(1.0, 3.0, size=(classes, dim))
    labels = np.repeat(np.arange(classes), n_per_class)
    features = np.abs(centres[labels] + rng.normal(0, spread, (len(labels), dim)))
    return features, labels, centres


def _head(rng, dim, classes):
    return [rng.normal(0, 0.3, (dim, classes)).astype(np.float32)], [np.zeros(classes, np.float32)]


def _softmax(logits):
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


@pytest.fixture
def fitted():
    rng = np.random.default_rng(0)
    features, labels, centres = _clusters(rng)
    val, val_labels, _ = _clusters(np.random.default_rng(1), n_per_class=20)
    val = np.abs(centres[val_labels] + np.random.default_rng(2).normal(0, 0.3, val.shape))
    kernels, biases = _head(rng, features.shape[1], 3)
    probs = _softmax(sel.head_logits(val, kernels, biases))
    model = sel.fit(features, labels, val, probs, val_labels, kernels, biases, "mahalanobis",
                    ood=True, keep=0.95, unsure=True, target_accuracy=0.9)
    far = rng.uniform(6.0, 9.0, size=(30, features.shape[1]))  # none of the classes
    return model, val, probs, far


@pytest.mark.parametrize("method", ["mahalanobis", "knn"])
def test_each_distance_ranks_far_points_above_the_classes(fitted, method):
    # (energy ranks by the size of the logits, not by distance: a random head makes far,
    # large features look surer, so it has no such test; evaluate.ood_dir measures it)
    model, val, _, far = fitted
    scores_in, scores_out = model.scores(val)[method], model.scores(far)[method]
    assert (scores_out > scores_in.max()).mean() >= 0.9, method


def test_energy_is_minus_the_log_sum_exp_of_the_heads_logits(fitted):
    model, val, _, _ = fitted
    logits = sel.head_logits(val, model.arrays["head_kernels"], model.arrays["head_biases"])
    np.testing.assert_allclose(model.scores(val)["energy"],
                               -np.log(np.exp(logits).sum(axis=1)), rtol=1e-5)


def test_the_threshold_keeps_the_chosen_share_of_validation(fitted):
    model, val, probs, far = fitted
    status, _ = model.status(probs, val)
    assert 0.93 <= (status != sel.UNKNOWN).mean() <= 1.0  # ood_keep 0.95 of 60 images
    far_status, _ = model.status(_softmax(sel.head_logits(far, model.arrays["head_kernels"],
                                                          model.arrays["head_biases"])), far)
    assert (far_status == sel.UNKNOWN).all()


def test_mahalanobis_is_the_distance_to_the_nearest_class_mean():
    rng = np.random.default_rng(3)
    features, labels, _ = _clusters(rng, n_per_class=200, dim=4, spread=0.5)
    kernels, biases = _head(rng, 4, 3)
    model = sel.Selective("mahalanobis", None, None, {},
                          sel.fit_arrays(features, labels, 3, kernels, biases))
    point = features[:5] + 0.1
    means = np.stack([features[labels == c].mean(0) for c in range(3)])
    precision = np.linalg.inv(np.cov((features - means[labels]).T, bias=True))
    expected = np.min([np.einsum("nd,de,ne->n", point - m, precision, point - m)
                       for m in means], axis=0)
    # Ledoit-Wolf shrinks the covariance a little: close, not equal, with 600 points in 4-d
    np.testing.assert_allclose(model.scores(point)["mahalanobis"], expected, rtol=0.15)


def test_a_higher_target_accuracy_never_answers_more():
    rng = np.random.default_rng(4)
    confidence = rng.uniform(0.3, 1.0, 500)
    correct = rng.uniform(size=500) < confidence  # surer answers are more often right
    coverages = []
    for target in np.linspace(0.5, 1.0, 26):
        threshold, _ = sel.confidence_threshold(confidence, correct, target)
        kept = confidence >= threshold
        coverages.append(kept.mean())
        if kept.any() and correct[kept].mean() >= target:
            # the lowest such threshold: one step lower misses the target
            lower = confidence[confidence < threshold]
            if len(lower):
                wider = confidence >= lower.max()
                assert correct[wider].mean() < target
    assert all(a >= b for a, b in zip(coverages, coverages[1:], strict=False))
    assert coverages[0] > coverages[-1]


def test_an_unreachable_target_keeps_the_best_accuracy_and_says_so():
    confidence = np.array([0.9, 0.8, 0.7, 0.6])
    correct = np.array([False, True, True, False])
    threshold, reached = sel.confidence_threshold(confidence, correct, 0.99)
    assert not reached and threshold == pytest.approx(0.7)  # 2 of 3 right: the best there is


def test_risk_coverage_and_its_area():
    confidence = np.array([0.9, 0.9, 0.6, 0.5])
    correct = np.array([True, False, True, False])
    curve = sel.risk_coverage(confidence, correct)
    assert curve["coverage"].tolist() == [0.5, 0.75, 1.0]  # the tie kept together
    assert curve["accuracy"].tolist() == pytest.approx([0.5, 2 / 3, 0.5])
    perfect = sel.aurc(np.array([0.9, 0.8, 0.1]), np.array([True, True, False]))
    worst = sel.aurc(np.array([0.1, 0.8, 0.9]), np.array([True, True, False]))
    assert perfect < worst


def test_unknown_takes_precedence_and_checks_turn_off():
    confidence = np.array([0.99, 0.2, 0.2, 0.99])
    score = np.array([1.0, 1.0, 9.0, 9.0])
    assert sel.statuses(confidence, score, 0.5, 5.0).tolist() == [
        "ok", "unsure", "unknown", "unknown"]
    assert sel.statuses(confidence, score, None, None).tolist() == ["ok"] * 4


def test_saved_and_loaded_it_scores_the_same(fitted, tmp_path):
    model, val, probs, far = fitted
    model.save(tmp_path / "selective.npz")
    loaded = sel.Selective.load(tmp_path / "selective.npz")
    for method in sel.METHODS:
        np.testing.assert_allclose(loaded.scores(far)[method], model.scores(far)[method],
                                   rtol=1e-5)
    assert loaded.status(probs, val)[0].tolist() == model.status(probs, val)[0].tolist()
    assert loaded.notes == model.notes
