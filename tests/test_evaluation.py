"""The evaluation's building blocks against closed forms, brute force and invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from eval_fixtures import one_thread  # noqa: F401 (autouse)
from fastclr.errors import FastclrError
from fastclr.evaluation.classifier import shift_and_flip
from fastclr.evaluation.curve import mean_and_spread
from fastclr.evaluation.finetune import linear_head
from fastclr.evaluation.quality import alignment, effective_rank, uniformity
from fastclr.evaluation.subsets import fraction_per_class, stratified_folds, stratified_subset
from fastclr.evaluation.probe import LogisticModel


def imbalanced_labels() -> np.ndarray:
    rng = np.random.default_rng(5)
    return rng.permutation(np.repeat(np.arange(4), [30, 55, 12, 80]))


def test_stratified_subsets_are_exact_fixed_per_seed_and_nested() -> None:
    y = imbalanced_labels()
    a = stratified_subset(y, 10, seed=3)
    assert np.bincount(y[a], minlength=4).tolist() == [10, 10, 10, 10]
    assert len(np.unique(a)) == 40 and np.all(np.diff(a) > 0)
    np.testing.assert_array_equal(a, stratified_subset(y.copy(), 10, seed=3))  # same seed: same images
    assert not np.array_equal(a, stratified_subset(y, 10, seed=4))  # another seed: another draw
    assert set(a) <= set(stratified_subset(y, 12, seed=3))  # nested: more labels keep the fewer ones


@pytest.mark.parametrize("folds", [5, 10])
def test_stratified_folds_hold_each_class_in_its_share(folds: int) -> None:
    y = np.concatenate([imbalanced_labels(), [4]])  # counts 30, 55, 12, 80 and a class of one
    fold = stratified_folds(y, folds, seed=2)
    assert fold.dtype == np.int64 and fold.shape == y.shape and set(fold.tolist()) == set(range(folds))
    sizes = np.bincount(fold, minlength=folds)
    assert sizes.max() - sizes.min() <= 1  # the folds are as equal as len(y) allows
    for c, n in enumerate(np.bincount(y)):
        per_fold = np.bincount(fold[y == c], minlength=folds)
        assert set(per_fold.tolist()) <= {n // folds, -(-n // folds)}  # floor or ceil of n / folds
    np.testing.assert_array_equal(fold, stratified_folds(y.copy(), folds, seed=2))  # fixed by the seed
    assert not np.array_equal(fold, stratified_folds(y, folds, seed=3))
    # 10 labels of each of 10 classes in 5 folds: every held-out fold is 2 images of every class
    ten = np.repeat(np.arange(10), 10)
    f = stratified_folds(ten, 5, seed=0)
    assert all(np.bincount(ten[f == k], minlength=10).tolist() == [2] * 10 for k in range(5))
    # 1 label of each of 10 classes: fold 0 holds 2 classes, and which two changes with the seed
    one = np.arange(10)
    held = {tuple(one[stratified_folds(one, 5, seed=s) == 0]) for s in range(20)}
    assert all(len(h) == 2 for h in held) and len(held) > 5


def test_more_labels_than_a_class_holds_is_a_one_line_error() -> None:
    with pytest.raises(FastclrError) as e:
        stratified_subset(imbalanced_labels(), 13, seed=0, class_names=["a", "b", "c", "d"])
    msg = str(e.value)
    assert "\n" not in msg
    assert "asked for 13 labels per class but class 2 (c) has only 12" in msg and "at most 12" in msg


def test_label_fractions_are_class_balanced_counts() -> None:
    y = np.repeat(np.arange(10), 6000)  # Fashion-MNIST's train split
    assert fraction_per_class(y, 0.01, 10) == 60 and fraction_per_class(y, 0.1, 10) == 600
    with pytest.raises(FastclrError):
        fraction_per_class(y, 1.5, 10)


def test_effective_rank_of_known_matrices() -> None:
    assert effective_rank(torch.eye(8)) == pytest.approx(8.0)
    u, v = torch.randn(50, 1, dtype=torch.float64), torch.randn(1, 16, dtype=torch.float64)
    assert effective_rank(u @ v) == pytest.approx(1.0, abs=1e-6)  # rank 1: one non-zero singular value
    p = torch.tensor([0.75, 0.25])
    assert effective_rank(torch.diag(torch.tensor([3.0, 1.0]))) == pytest.approx(math.exp(-(p * p.log()).sum()))
    # Collapse that centring would hide: every row the same vector plus tiny noise.
    collapsed = torch.ones(200, 32) + 1e-6 * torch.randn(200, 32)
    assert effective_rank(collapsed) < 1.01


@pytest.mark.parametrize("shape", [(40, 300), (300, 40)])
def test_effective_rank_from_the_gram_matrix_equals_the_svd_definition(shape: tuple[int, int]) -> None:
    # wide (N < D, x x^T) and tall (x^T x) features, post-ReLU like h, with a decaying spectrum
    g = torch.Generator().manual_seed(1)
    x = torch.relu(torch.randn(*shape, generator=g, dtype=torch.float64)) * torch.rand(shape[1], generator=g, dtype=torch.float64) ** 3
    s = torch.linalg.svdvals(x)
    p = s / s.sum()
    assert effective_rank(x) == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-9)


def test_alignment_closed_forms() -> None:
    z = torch.randn(20, 5)
    assert alignment(z, 3 * z) == pytest.approx(0.0, abs=1e-12)  # scale does not matter: features are normalised
    assert alignment(z, -z) == pytest.approx(4.0)  # antipodes: ||a - (-a)||^2 = 4


def test_uniformity_closed_forms_and_brute_force() -> None:
    assert uniformity(torch.eye(6)) == pytest.approx(-4.0)  # every pair of an orthonormal basis at distance^2 = 2
    assert uniformity(torch.ones(10, 3)) == pytest.approx(0.0)  # collapsed
    z = torch.randn(30, 4, dtype=torch.float64)
    zn = z / z.norm(dim=1, keepdim=True)
    terms = [math.exp(-2 * float((zn[i] - zn[j]).pow(2).sum())) for i in range(30) for j in range(30) if i != j]
    assert uniformity(z) == pytest.approx(math.log(sum(terms) / len(terms)), rel=1e-9)


def test_mean_and_spread_uses_the_sample_std() -> None:
    s = mean_and_spread([0.5, 0.7, 0.9])
    assert s["mean"] == pytest.approx(0.7) and s["std"] == pytest.approx(0.2) and (s["min"], s["max"]) == (0.5, 0.9)
    assert mean_and_spread([0.8])["std"] == 0.0


def test_linear_head_computes_the_logistic_models_logits() -> None:
    model = LogisticModel(torch.randn(3, 7), torch.randn(3), torch.randn(7), torch.rand(7) + 0.5)
    x = torch.randn(11, 7)
    torch.testing.assert_close(linear_head(model, torch.device("cpu"))(x), model.logits(x), rtol=1e-5, atol=1e-5)


def test_shift_and_flip_moves_pixels_without_changing_them() -> None:
    x = torch.zeros(64, 1, 9, 9)
    x[:, 0, 4, 4] = 1.0  # one bright pixel in the centre
    g = torch.Generator().manual_seed(0)
    out = shift_and_flip(x, 2, 0.0, g)
    ys, xs = torch.nonzero(out[:, 0] == 1.0, as_tuple=True)[1:]
    assert out.sum() == 64 and len(ys) == 64  # each image: the pixel moved, intact, nothing else appeared
    assert (ys - 4).abs().max() <= 2 and (xs - 4).abs().max() <= 2
    assert len(set(zip(ys.tolist(), xs.tolist()))) > 10  # shifts differ between images
    torch.testing.assert_close(out, shift_and_flip(x, 2, 0.0, torch.Generator().manual_seed(0)))  # seeded
    r = torch.rand(5, 3, 6, 6)
    torch.testing.assert_close(shift_and_flip(r, 0, 1.0, g), r.flip(-1))  # no shift, always flip: a mirror



def test_features_with_one_bad_row_are_refused_naming_how_many() -> None:
    """One NaN row among finite ones is enough to make every protocol's figure garbage (argmax of
    NaN is class 0): refused in one line that counts the bad rows, here 1 of 5 (and 2 of 5 for a
    NaN and an infinity in other rows). All-finite features pass through unchanged."""
    from fastclr.evaluation.features import require_finite

    h = torch.randn(5, 4)
    assert require_finite(h, "h") is h
    h[2, 1] = float("nan")
    with pytest.raises(FastclrError, match=r"^h hold NaN or infinite values \(1 of 5 rows\)"):
        require_finite(h, "h")
    h[4, 0] = float("inf")
    with pytest.raises(FastclrError, match=r"\(2 of 5 rows\)"):
        require_finite(h, "h")


def test_the_state_checksum_covers_batchnorm_statistics_not_only_parameters() -> None:
    """Feature extraction proves it left the encoder unchanged by a checksum taken before and after;
    a train-mode pass moves BatchNorm's running statistics (buffers, not parameters) and nothing
    else, so the checksum must change with them, and with the batch count, and with a weight."""
    from fastclr.evaluation.features import state_checksum

    m = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    base = state_checksum(m)
    assert state_checksum(m) == base  # a pure function of the state
    changes = [lambda: m[1].running_mean.add_(1.0), lambda: m[1].running_var.mul_(2.0),
               lambda: m[1].num_batches_tracked.add_(1), lambda: m[0].weight.data.add_(1.0)]
    seen = {base}
    for change in changes:
        with torch.no_grad():
            change()
        seen.add(state_checksum(m))
    assert len(seen) == len(changes) + 1
