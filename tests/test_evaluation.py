"""The evaluation's building blocks against closed forms, brute force and invariants."""

from __future__ import annotations

import math
import re

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


@pytest.mark.parametrize("block_bytes", [8, 8 * 23, 8 * 24 * 7, 64 << 20])
def test_uniformity_in_row_blocks_is_the_brute_force_over_every_pair(block_bytes: int) -> None:
    """In blocks of one row, of a few rows, of rows not dividing N, or whole: each unordered pair
    once, as the float64 brute force (it built the whole N x N matrix and its pair indices, 28.8 GB
    at `--quality-images 60000`)."""
    z = torch.randn(24, 5, generator=torch.Generator().manual_seed(3))
    n = torch.nn.functional.normalize(z.double(), dim=1)
    terms = [math.exp(-2.0 * float((n[i] - n[j]).pow(2).sum())) for i in range(24) for j in range(i + 1, 24)]
    assert uniformity(z, block_bytes=block_bytes) == pytest.approx(math.log(sum(terms) / len(terms)), rel=1e-12)


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


def test_a_class_named_but_without_images_is_named_even_when_it_is_the_last() -> None:
    """The classes are the named ones, not those up to the largest label seen: a last class with no
    labelled image is refused by name, as a middle one is."""
    with pytest.raises(FastclrError, match=r"class 2 \(c\) has no labelled training images"):
        stratified_subset(np.array([0, 0, 1, 1]), 1, 0, ["a", "b", "c"])


def test_a_label_fraction_gives_the_nearest_class_balanced_count_and_at_least_one() -> None:
    """The labels per class whose class-balanced subset is nearest `fraction` of the labels (1000
    labels of 10 classes: 1.9 per class is 2, not 1), and never none (0.1 per class is 1)."""
    y = np.repeat(np.arange(10), 100)
    for fraction in (0.001, 0.011, 0.019, 0.026, 0.064, 0.3):
        nearest = min(range(1, 101), key=lambda n: abs(n * 10 - fraction * len(y)))
        assert fraction_per_class(y, fraction, 10) == nearest, fraction


def test_a_fraction_with_an_empty_class_is_left_to_the_subset_to_name() -> None:
    """labels_for_fraction refuses a class too small for the fraction; a class of none is not
    "at most 0" of a fraction but named by the subset (the documented split of the two errors)."""
    from fastclr.evaluation.subsets import labels_for_fraction

    labels = np.array([0] * 10 + [1] * 10)  # class 2 has no labelled image
    n = labels_for_fraction(labels, 0.5, 3, "--label-fraction")
    assert n == fraction_per_class(labels, 0.5, 3)
    with pytest.raises(FastclrError, match=r"class 2 \(c\) has no labelled training images"):
        stratified_subset(labels, n, 0, ["a", "b", "c"])


def test_the_label_sweep_evaluates_each_seeds_own_subset_with_that_seed() -> None:
    """evaluate(indices, seed) gets the stratified subset of n labels per class for that seed and
    the seed itself (its training draws), and each run records both; the summary is over the
    returned accuracies."""
    from fastclr.evaluation.curve import label_sweep
    from fastclr.evaluation.subsets import subset_id

    y = imbalanced_labels()
    calls: list[tuple[list[int], int]] = []
    accuracy = {(3, 5): 0.5, (3, 9): 0.8, (7, 5): 0.6, (7, 9): 0.7}

    def evaluate(idx: np.ndarray, seed: int) -> dict[str, float]:
        calls.append((idx.tolist(), seed))
        return {"accuracy": accuracy[(len(idx) // 4, seed)]}

    out = label_sweep(y, [3, 7], [5, 9], ["a", "b", "c", "d"], evaluate)
    assert calls == [(stratified_subset(y, n, s).tolist(), s) for n in (3, 7) for s in (5, 9)]
    for entry, n in zip(out, (3, 7)):
        assert entry["labels_per_class"] == n
        assert [(r["seed"], r["subset"]) for r in entry["runs"]] == [(s, subset_id(stratified_subset(y, n, s)))
                                                                     for s in (5, 9)]
        assert entry["mean"] == pytest.approx((accuracy[(n, 5)] + accuracy[(n, 9)]) / 2)


@pytest.mark.parametrize("alpha", [1.0, 3.0])
def test_alignment_takes_the_distance_to_the_power_alpha(alpha: float) -> None:
    g = torch.Generator().manual_seed(7)
    z1, z2 = torch.randn(15, 4, generator=g, dtype=torch.float64), torch.randn(15, 4, generator=g, dtype=torch.float64)
    terms = [float((z1[i] / z1[i].norm() - z2[i] / z2[i].norm()).norm()) ** alpha for i in range(15)]
    assert alignment(z1, z2, alpha) == pytest.approx(sum(terms) / len(terms), rel=1e-12)


@pytest.mark.parametrize("t", [0.5, 5.0])
def test_uniformity_takes_its_temperature_t(t: float) -> None:
    z = torch.randn(12, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    zn = z / z.norm(dim=1, keepdim=True)
    terms = [math.exp(-t * float((zn[i] - zn[j]).pow(2).sum())) for i in range(12) for j in range(12) if i != j]
    assert uniformity(z, t) == pytest.approx(math.log(sum(terms) / len(terms)), rel=1e-9)


def test_feature_quality_measures_rank_on_h_and_alignment_and_uniformity_on_the_views() -> None:
    """Effective rank of the clean features h, alignment between the first and the second views,
    uniformity the mean of the two views' own (Wang & Isola's code): each against its definition
    on inputs where every other choice gives another number."""
    from fastclr.evaluation.quality import feature_quality

    g = torch.Generator().manual_seed(9)
    h = torch.randn(14, 6, generator=g, dtype=torch.float64) * torch.tensor([4.0, 2.0, 1.0, 0.5, 0.2, 0.1],
                                                                            dtype=torch.float64)
    v1 = torch.randn(10, 6, generator=g, dtype=torch.float64)
    v2 = v1 + 0.3 * torch.randn(10, 6, generator=g, dtype=torch.float64)
    v2[:, 0] += 2.0  # the second view's cloud is shifted: its uniformity is not the first's

    def unit(z: torch.Tensor) -> torch.Tensor:
        return z / z.norm(dim=1, keepdim=True)

    def uniform(z: torch.Tensor) -> float:
        u = unit(z)
        terms = [math.exp(-2 * float((u[i] - u[j]).pow(2).sum())) for i in range(len(u)) for j in range(len(u)) if i != j]
        return math.log(sum(terms) / len(terms))

    s = torch.linalg.svdvals(h)
    p = s / s.sum()
    q = feature_quality(h, v1, v2)
    assert q["effective_rank"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-9)
    assert q["alignment"] == pytest.approx(float((unit(v1) - unit(v2)).pow(2).sum(1).mean()), rel=1e-9)
    assert q["uniformity"] == pytest.approx(0.5 * (uniform(v1) + uniform(v2)), rel=1e-9)
    assert abs(uniform(v1) - uniform(v2)) > 0.05 and q["feature_dim"] == 6


def test_the_untrained_encoder_is_the_seeded_initialisation_in_eval_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the untrained reference measures: the weights torch.manual_seed(seed) then the spec's
    encoder give, in eval mode (BatchNorm on its running statistics), the caller's random state
    untouched: the CPU's restored, the GPUs' never seeded (torch.manual_seed reseeded them all)."""
    from fastclr.evaluation.reference import untrained_encoder
    from fastclr.models import EncoderSpec, encoder_from_spec

    spec = EncoderSpec("cnn", 1, 28, 0.125, "off", 64, (0.5,), (0.25,), "32|256|fc512")
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "manual_seed_all", lambda seed: pytest.fail("the GPUs' generators were seeded"))
        enc = untrained_encoder(spec, 4, torch.device("cpu"))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not any(m.training for m in enc.modules())
    torch.manual_seed(4)
    want = encoder_from_spec(spec).state_dict()
    assert all(torch.equal(v, want[k]) for k, v in enc.state_dict().items())


def test_a_from_scratch_networks_head_is_drawn_after_its_encoder_as_pretrain_draws_them() -> None:
    """The baseline's encoder is the run's initial network for the seed; its head was drawn from the
    seed's start again, the encoder's own draws, so its weights were the first convolution's times a
    constant (and a neck's, drawn before it, too). Now seed, encoder, neck, linear layer continue one
    stream: the encoder is still exactly the untrained reference, and no layer copies another."""
    from types import SimpleNamespace

    from fastclr.evaluation.reference import untrained_encoder
    from fastclr.evaluation.supervised import scratch_network
    from fastclr.models import EncoderSpec

    spec = EncoderSpec("cnn", 1, 28, 0.25, "n/a", 128, (0.5,), (0.25,), "32,32,32p|256p|fc512")
    setup = SimpleNamespace(device=torch.device("cpu"), classes=list("abcdefghij"))

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        n = min(a.numel(), b.numel())
        return abs(float(torch.corrcoef(torch.stack([a.flatten()[:n], b.flatten()[:n]]))[0, 1]))

    reference = untrained_encoder(spec, 3, torch.device("cpu")).state_dict()
    for make_neck in (None, lambda: torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.ReLU())):
        enc, head = scratch_network(spec, setup, 3, make_neck, 64 if make_neck else 0)  # type: ignore[arg-type]
        assert all(torch.equal(v, reference[k]) for k, v in enc.state_dict().items())
        stem = next(v for k, v in enc.state_dict().items() if k.endswith("weight") and v.dim() == 4)
        layers = [m.weight.detach() for m in head.modules() if isinstance(m, torch.nn.Linear)]
        assert len(layers) == (2 if make_neck else 1)
        assert all(corr(stem, w) < 0.3 for w in layers) and (len(layers) == 1 or corr(*layers) < 0.3)


def test_finetune_trains_a_copy_with_its_recipe_and_the_scratch_runs_with_the_setups(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """For each label fraction and seed: the fine-tuned run gets a copy of the encoder, the frozen
    features of the subset's images, and the fine-tuning recipe; the from-scratch run gets the
    setup's own recipe (the supervised baseline's); scratch_mean is the mean of the scratch runs."""
    import fastclr.evaluation.finetune as finetune_module
    from fastclr.evaluation.classifier import LabelledSetup, TrainRecipe
    from fastclr.runtime import FP32

    labels = np.repeat(np.arange(4), 25)
    scratch_recipe = TrainRecipe(5, 8, 1e-3, 0.0, 0.0, 0.25, 0.5)
    tuned_recipe = TrainRecipe(7, 4, 1e-2, 0.0, 0.0, 0.0, 0.5)
    images = np.zeros((100, 4, 4, 1), np.uint8)
    setup = LabelledSetup(images, labels, images[:8], labels[:8], ["a", "b", "c", "d"], torch.tensor([0.0]),
                          torch.tensor([1.0]), 4, torch.device("cpu"), FP32, scratch_recipe)
    encoder = torch.nn.Linear(3, 3)
    train_x = torch.arange(100.0)[:, None].repeat(1, 3)  # row i holds i: which rows were passed is seen
    tuned_acc, scratch_acc = {0: 0.5, 1: 0.7}, {0: 0.2, 1: 0.3}
    seen: list[tuple[str, int, TrainRecipe]] = []

    def probe_then_finetune(backbone, subset_x, test_x, s, idx, seed):  # type: ignore[no-untyped-def]
        assert backbone is not encoder and torch.equal(subset_x[:, 0], torch.from_numpy(idx).float())
        seen.append(("tuned", seed, s.recipe))
        return None, {"accuracy": tuned_acc[seed], "linear_accuracy": 0.0}

    def train_from_scratch(spec, s, idx, seed):  # type: ignore[no-untyped-def]
        seen.append(("scratch", seed, s.recipe))
        return {"accuracy": scratch_acc[seed]}

    monkeypatch.setattr(finetune_module, "probe_then_finetune", probe_then_finetune)
    monkeypatch.setattr(finetune_module, "train_from_scratch", train_from_scratch)
    out = finetune_module.finetune(encoder, None, train_x, train_x[:8], setup, tuned_recipe,  # type: ignore[arg-type]
                                   (0.2,), (0, 1))
    assert seen == [("tuned", 0, tuned_recipe), ("scratch", 0, scratch_recipe),
                    ("tuned", 1, tuned_recipe), ("scratch", 1, scratch_recipe)]
    entry = out[0]
    assert entry["fraction"] == 0.2 and entry["labels_per_class"] == 5 and entry["label_fraction"] == 20 / 100
    assert entry["mean"] == pytest.approx(0.6) and entry["scratch_mean"] == pytest.approx(0.25)
    # 25 labels a class: 1% and 3% both round to one label per class, 4% of the labels. One subset,
    # measured once, and the share it holds recorded; 1% and 3% on separate rows named two runs of one.
    seen.clear()
    lines: list[str] = []
    out = finetune_module.finetune(encoder, None, train_x, train_x[:8], setup, tuned_recipe,  # type: ignore[arg-type]
                                   (0.01, 0.03, 0.2), (0,), log=lines.append)
    assert [(e["fraction"], e["labels_per_class"], e["label_fraction"]) for e in out] == [(0.01, 1, 0.04), (0.2, 5, 0.2)]
    assert len(seen) == 4 and "note: label fractions 0.01 and 0.03 both give 1 per class here: measured once" in lines


def test_the_few_label_curve_scores_each_subsets_probe_on_the_test_split() -> None:
    """Each run's accuracy is the probe fitted on that seed's subset scored on the test features:
    with test labels that disagree with the training ones it is near 0, where the subset's own
    accuracy would be near 1."""
    from fastclr.evaluation.fewshot import fewshot_fit, fewshot_probe
    from fastclr.evaluation.subsets import stratified_subset

    g = torch.Generator().manual_seed(0)
    centres = 6 * torch.randn(4, 5, generator=g)
    y, yt = torch.arange(200) % 4, torch.arange(80) % 4
    x, xt = centres[y] + torch.randn(200, 5, generator=g), centres[yt] + torch.randn(80, 5, generator=g)
    wrong = (yt + 1) % 4
    out = fewshot_probe(x, y.numpy(), xt, wrong.numpy(), (5,), (3,), ["a", "b", "c", "d"])
    (run,) = out[0]["runs"]
    idx = torch.from_numpy(stratified_subset(y.numpy(), 5, 3, ["a", "b", "c", "d"]))
    assert run["accuracy"] == fewshot_fit(x[idx], y[idx], xt, wrong, 3).accuracy < 0.2


def test_images_not_in_the_stored_form_are_refused_in_one_line_before_any_h() -> None:
    """extract_features and two_views took floats in [0, 1] (torchvision's ToTensor) and divided
    them by 255 again: h off by up to the size of h itself, and near-black views, without a word;
    (N, C, H, W), a single image or images with other channels than the encoder's failed deep in
    torch. The uint8 form gives the h the same images give as floats converted back."""
    from fastclr.augment import two_views
    from fastclr.config import AugmentConfig
    from fastclr.evaluation.features import extract_features

    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    images = np.random.default_rng(0).integers(0, 256, (5, 12, 12, 1), dtype=np.uint8)
    mean, std, cpu = torch.tensor([0.5]), torch.tensor([0.25]), torch.device("cpu")
    h = extract_features(encoder, images, mean, std, cpu)
    x = (images.astype(np.float64) / 255 - 0.5) / 0.25
    expected = encoder.double()(torch.from_numpy(x).permute(0, 3, 1, 2)).float()
    encoder.float()
    assert torch.allclose(h, expected, atol=1e-5)
    for bad, said in [(images.astype(np.float32) / 255, "are float32; fastclr takes them as stored, uint8 (N, H, W, C)"),
                      (images[0], "have shape (12, 12, 1); fastclr takes uint8 (N, H, W, C) with C 1 or 3"),
                      (images.transpose(0, 3, 1, 2).copy(), "have shape (5, 1, 12, 12)")]:
        with pytest.raises(FastclrError, match=re.escape(said)):
            extract_features(encoder, bad, mean, std, cpu)
    with pytest.raises(FastclrError, match="the images have 3 channels and the mean and std 1 and 1"):
        extract_features(encoder, np.repeat(images, 3, axis=3), mean, std, cpu)
    assert extract_features(encoder, images[:0], mean, std, cpu).shape == (0, 4)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(FastclrError, match="are float32"):
        two_views(torch.from_numpy(images).float() / 255, AugmentConfig(), g)


def test_knn_and_probe_refuse_settings_and_labels_that_cannot_pair_and_take_int32_labels_as_meant() -> None:
    """knn_accuracy with k 0 or -1 returned the share of class 0 among the queries (every vote zero,
    argmax 0), tau 0 a number; labels of another length an IndexError; int32 labels torch's dtype
    error in the probe. One line each now; int32 labels give the int64 labels' accuracy."""
    from fastclr.evaluation.knn import knn_accuracy
    from fastclr.evaluation.probe import linear_probe

    g = torch.Generator().manual_seed(0)
    y = torch.arange(40) % 2
    x = torch.randn(40, 3, generator=g) + 10 * torch.eye(3)[y]  # two clusters in other directions (kNN is cosine)
    assert knn_accuracy(x, y, x, y, k=5) == knn_accuracy(x, y.int(), x, y.to(torch.uint8), k=5) == 1.0
    for k, tau in [(0, 0.07), (-1, 0.07), (5, 0.0)]:
        with pytest.raises(FastclrError, match=re.escape(f"kNN needs k >= 1 and tau > 0, got k {k} and tau {tau}")):
            knn_accuracy(x, y, x, y, k=k, tau=tau)
    with pytest.raises(FastclrError, match=re.escape("the queries' labels have shape (39,) for 40 rows of features")):
        knn_accuracy(x, y, x, y[:39])
    with pytest.raises(FastclrError, match=re.escape("knn_accuracy takes torch tensors; test_x is a numpy.ndarray")):
        knn_accuracy(x, y, x.numpy(), y)  # numpy's failed on .dim() deep inside
    wrong = torch.tensor([0, 0, 1, 1, 1, 0])  # each query's own bank row votes at k 1: right for 4 of 6
    pairs = torch.tensor([[1.0, 0.0], [1.0, 0.1], [1.0, 0.2], [0.0, 1.0], [0.1, 1.0], [0.2, 1.0]])
    assert knn_accuracy(pairs, torch.tensor([0, 0, 0, 1, 1, 1]), pairs, wrong, k=1) == 4 / 6  # exact, not float32's
    with pytest.raises(FastclrError, match="the training labels are float32; give integer class indices"):
        linear_probe(x, y.float(), x, y, l2_grid=(1e-3,))
    with pytest.raises(FastclrError, match=re.escape("the test labels hold -1; class indices start at 0")):
        linear_probe(x, y, x, y - 1, l2_grid=(1e-3,))
    assert linear_probe(x, y.int(), x, y.int(), l2_grid=(1e-3,)).accuracy == \
        linear_probe(x, y, x, y, l2_grid=(1e-3,)).accuracy == 1.0
