"""Frozen features, logistic regression (against scikit-learn) and kNN (against brute force)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import synthetic_images
from fastclr.evaluation import probe as probe_module
from fastclr.evaluation.knn import cosine_topk, knn_accuracy, knn_predict
from fastclr.runtime import FP32, Precision
from fastclr.evaluation.probe import L2_GRID, fit_logistic_regression, linear_probe, standardize
from fastclr.evaluation.subsets import stratified_folds
from fastclr.evaluation.features import extract_features, prepare_images


def blobs(n: int, d: int, k: int, seed: int, spread: float = 2.0, centre_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    centres = torch.randn(k, d, generator=torch.Generator().manual_seed(centre_seed)) * spread
    g = torch.Generator().manual_seed(seed + 1000)
    y = torch.randint(0, k, (n,), generator=g)
    return centres[y] + torch.randn(n, d, generator=g), y


def scripted_logits(xv: torch.Tensor, x: torch.Tensor, y: torch.Tensor, accuracy: float, margin: float = 4.0
                    ) -> torch.Tensor:
    """Logits for the rows `xv` of `x` (labels `y`) whose arg-max is right on the first
    round(accuracy * len(xv)) rows and one class off on the rest, the top logit `margin` above the
    others: held-out accuracy `accuracy`, mean cross-entropy log(e^margin + K - 1) - accuracy * margin."""
    k = int(y.max()) + 1
    yv = y[(xv[:, None, :] == x[None]).all(-1).nonzero()[:, 1]]
    right = torch.arange(len(yv)) < round(accuracy * len(yv))
    top = torch.where(right, yv, (yv + 1) % k)
    return F.one_hot(top, k).float() * margin


def scripted_loss(accuracy: float, k: int, margin: float = 4.0) -> float:
    return float(np.log(np.exp(margin) + k - 1) - accuracy * margin)


class ScriptedModel:
    """A fitted model whose held-out logits a test scripts by penalty; 1.0 on the final fit's rows."""

    def __init__(self, l2: float, logits_of: Callable[[float, torch.Tensor], torch.Tensor]) -> None:
        self.l2, self.logits_of = l2, logits_of

    def accuracy(self, xv: torch.Tensor, yv: torch.Tensor) -> float:
        return 1.0

    def logits(self, xv: torch.Tensor) -> torch.Tensor:
        return self.logits_of(self.l2, xv)


def test_logistic_regression_matches_scikit_learn() -> None:
    sk = pytest.importorskip("sklearn.linear_model")
    x, y = blobs(1500, 20, 5, 0, spread=0.6)
    xt, yt = blobs(800, 20, 5, 1, spread=0.6)
    l2 = 1e-2
    ours = fit_logistic_regression(x, y, 5, l2, max_iter=500)
    xs = ((x - ours.mean) / ours.std).numpy()
    # ours: mean CE + l2/2 |W|^2  ==  (1/N) * (sum CE + N l2/2 |W|^2), i.e. sklearn's C = 1 / (N l2)
    ref = sk.LogisticRegression(C=1 / (len(x) * l2), max_iter=2000, tol=1e-10).fit(xs, y.numpy())
    np.testing.assert_allclose(ours.weight.numpy(), ref.coef_ - ref.coef_.mean(0), atol=2e-3)
    acc_ref = ref.score(((xt - ours.mean) / ours.std).numpy(), yt.numpy())
    assert abs(ours.accuracy(xt, yt) - acc_ref) <= 0.01


def test_standardize_by_blocks_equals_the_whole_matrix_formula() -> None:
    x = torch.randn(1000, 13, generator=torch.Generator().manual_seed(3)) * 5 + 2
    x[:, 4] = 7.0  # a constant column: std clamped, standardised to 0, not NaN
    xs, mean, std = standardize(x, block=97)
    ref_std = x.std(0).clamp(min=1e-6)
    assert torch.equal(mean, x.mean(0)) and torch.equal(std, ref_std)
    assert torch.equal(xs, (x - x.mean(0)) / ref_std)
    # bf16 input (stats in fp64 by blocks) and bf16 output: the float64 formula, up to bf16 rounding
    xb = x.bfloat16()
    bs, bmean, bstd = standardize(xb, torch.bfloat16, block=97)
    x64 = xb.double()
    torch.testing.assert_close(bmean.double(), x64.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bstd.double(), x64.std(0).clamp(min=1e-6), rtol=1e-6, atol=1e-6)
    exact = (x64 - x64.mean(0)) / x64.std(0).clamp(min=1e-6)
    assert bs.dtype == torch.bfloat16
    assert float((bs.double() - exact).abs().max()) <= float(exact.abs().max()) * 2 ** -8
    # One row (a few-label selection fit of 2 classes with 1 label each): no spread, the clamped std
    # of a constant column and zeros out in both paths (the fp32 one gave NaN, and L-BFGS a traceback)
    for one in (x[:1], x[:1].bfloat16()):
        out, _, spread = standardize(one, block=97)
        assert torch.equal(out.float(), torch.zeros(1, 13)) and bool((spread == 1e-6).all())


def test_given_statistics_standardise_a_subset_as_part_of_the_whole() -> None:
    # a labelled subset standardised with the statistics of all (unlabelled) features: its rows are
    # exactly those rows of the whole set's standardisation, and the fitted model keeps those stats
    x = torch.randn(500, 6, generator=torch.Generator().manual_seed(4)) * 3 - 1
    whole, mean, std = standardize(x)
    part, pmean, pstd = standardize(x[:40], stats=(mean, std), block=7)
    assert torch.equal(part, whole[:40]) and torch.equal(pmean, mean) and torch.equal(pstd, std)
    own, _, _ = standardize(x[:40])
    assert not torch.allclose(own, whole[:40])  # the subset's own statistics differ
    y = (x[:40, 0] > -1).long()
    model = fit_logistic_regression(x[:40], y, 2, 1e-2, stats=(mean, std))
    assert torch.equal(model.mean, mean) and torch.equal(model.std, std)
    z = (x[:40].double() - mean.double()) / std.double()
    ref = z @ model.weight.double().T + model.bias.double()
    torch.testing.assert_close(model.logits(x[:40]).double(), ref, rtol=1e-5, atol=1e-5)


def test_bf16_features_reach_the_fp32_optimum_of_the_exact_objective() -> None:
    x, y = blobs(1500, 20, 5, 0, spread=0.6)
    xt, yt = blobs(800, 20, 5, 1, spread=0.6)
    l2 = 1e-2
    f32 = fit_logistic_regression(x, y, 5, l2, max_iter=500)
    b16 = fit_logistic_regression(x, y, 5, l2, max_iter=500, feature_dtype=torch.bfloat16)

    def objective(m) -> float:  # type: ignore[no-untyped-def]
        xs = ((x.double() - m.mean.double()) / m.std.double())
        logits = xs @ m.weight.double().T + m.bias.double()
        return float(torch.nn.functional.cross_entropy(logits, y) + 0.5 * l2 * (m.weight.double() ** 2).sum())

    # the bf16-stored features change the problem by their rounding only: the fit lands within
    # 1% of the fp32 optimum of the exact (float64) objective, with the same test accuracy
    assert objective(f32) <= objective(b16) <= objective(f32) * 1.01
    assert abs(b16.accuracy(xt, yt) - f32.accuracy(xt, yt)) <= 0.01
    assert Precision("bf16", "").feature_dtype is torch.bfloat16
    assert Precision("fp32", "").feature_dtype is torch.float32 and Precision("fp16", "").feature_dtype is torch.float32


def test_linear_probe_selects_l2_on_train_only_and_separates_easy_data() -> None:
    x, y = blobs(2000, 10, 4, 1, spread=5.0)
    res = linear_probe(x[:1500], y[:1500], x[1500:], y[1500:])
    assert res.accuracy == 1.0 and res.val_accuracy == 1.0 and res.l2 in L2_GRID


@pytest.mark.parametrize("stop_early", [True, False])
def test_l2_path_stops_at_the_first_fall_of_held_out_accuracy(monkeypatch: pytest.MonkeyPatch, stop_early: bool) -> None:
    # Scripted held-out accuracies along the path 1e-1 -> 1e-4: up, down, then a later higher peak.
    # With stop_early the walk ends at the first fall and keeps 1e-2; without it 1e-4 wins.
    scripted = {1e-1: 0.80, 1e-2: 0.90, 1e-3: 0.85, 1e-4: 0.95}
    fitted: list[tuple[float, int, int]] = []

    x, y = blobs(200, 3, 2, 0)

    class Fake:
        def __init__(self, l2: float) -> None:
            self.l2 = l2

        def accuracy(self, xv: torch.Tensor, yv: torch.Tensor) -> float:
            return scripted[self.l2]

        def logits(self, xv: torch.Tensor) -> torch.Tensor:  # held-out loss falls as the scripted accuracy rises
            return scripted_logits(xv, x, y, scripted[self.l2])

    def fake_fit(xf, yf, k, l2, max_iter=300, init=None, feature_dtype=torch.float32, stats=None):  # type: ignore[no-untyped-def]
        assert init is None or isinstance(init, Fake)
        fitted.append((l2, len(xf), max_iter))
        return Fake(l2)

    monkeypatch.setattr(probe_module, "fit_logistic_regression", fake_fit)
    res = linear_probe(x, y, x, y, select_iter=7, max_iter=11, stop_early=stop_early)
    path = [1e-1, 1e-2, 1e-3] if stop_early else [1e-1, 1e-2, 1e-3, 1e-4]
    chosen = 1e-2 if stop_early else 1e-4
    # selection fits on the 90% fit part at select_iter, then one final fit on all 200 rows
    assert fitted == [(l2, 180, 7) for l2 in path] + [(chosen, 200, 11)]
    assert res.l2 == chosen and res.val_accuracy == scripted[chosen]
    assert res.val_loss == pytest.approx(scripted_loss(scripted[chosen], 2), rel=1e-6)
    if stop_early:  # a tie ends the walk too, keeping the stronger penalty (as the docstring says)
        scripted.update({1e-1: 0.90, 1e-2: 0.90, 1e-3: 0.95})
        fitted.clear()
        assert linear_probe(x, y, x, y, select_iter=7, max_iter=11, stop_early=True).l2 == 1e-1
        assert [f[0] for f in fitted] == [1e-1, 1e-2, 1e-1]


@pytest.mark.parametrize("cross_validate", [True, False])
def test_cross_validation_pools_every_fold_held_out_once(monkeypatch: pytest.MonkeyPatch, cross_validate: bool) -> None:
    # Scripted held-out accuracy per (penalty, fold): fold 0 alone prefers 1e-1, the mean over the
    # five folds (equal sizes here) prefers 1e-2.
    scripted = {1e-1: [0.9, 0.5, 0.5, 0.5, 0.5], 1e-2: [0.6] * 5, 1e-3: [0.7, 0.55, 0.55, 0.55, 0.55]}
    x, y = blobs(200, 3, 2, 0)
    held_out: list[tuple[float, frozenset[int]]] = []
    fits: list[tuple[float, int]] = []

    class Fake:
        def __init__(self, l2: float, part: int) -> None:
            self.l2, self.part = l2, part

        def accuracy(self, xv: torch.Tensor, yv: torch.Tensor) -> float:  # the final fit's test and train accuracy
            return 1.0

        def logits(self, xv: torch.Tensor) -> torch.Tensor:
            rows = frozenset(int(i) for i in (xv[:, None, :] == x[None]).all(-1).nonzero()[:, 1])
            held_out.append((self.l2, rows))
            return scripted_logits(xv, x, y, scripted[self.l2][self.part])

    def fake_fit(xf, yf, k, l2, max_iter=300, init=None, feature_dtype=torch.float32, stats=None):  # type: ignore[no-untyped-def]
        fits.append((l2, len(xf)))
        return Fake(l2, sum(f[0] == l2 for f in fits) - 1) if len(xf) < len(x) else Fake(l2, 0)

    monkeypatch.setattr(probe_module, "fit_logistic_regression", fake_fit)
    res = linear_probe(x, y, x, y, l2_grid=(1e-1, 1e-2, 1e-3), folds=5, cross_validate=cross_validate,
                       stop_early=False)
    parts = 5 if cross_validate else 1
    assert fits[:-1] == [(l2, 160) for l2 in (1e-1, 1e-2, 1e-3) for _ in range(parts)] and fits[-1] == (res.l2, 200)
    dealt = stratified_folds(y.numpy(), 5, 0)
    for l2 in (1e-1, 1e-2, 1e-3):  # each penalty sees the class-balanced folds, held out in order, each once
        folds = [rows for p, rows in held_out if p == l2]
        assert folds == [frozenset(np.flatnonzero(dealt == f).tolist()) for f in range(parts)]
        for rows in folds:  # each fold holds a fifth of each class, give or take one row
            per_class = np.bincount(y[sorted(rows)].numpy(), minlength=2)
            assert all(abs(c - n / 5) < 1 for c, n in zip(per_class, np.bincount(y.numpy(), minlength=2)))
    if cross_validate:
        assert res.l2 == 1e-2 and res.val_accuracy == pytest.approx(0.6)
    else:
        assert res.l2 == 1e-1 and res.val_accuracy == pytest.approx(0.9)


@pytest.mark.parametrize("select_by", ["loss", "accuracy"])
def test_penalties_that_tie_on_held_out_accuracy_are_told_apart_by_held_out_loss(
        monkeypatch: pytest.MonkeyPatch, select_by: str) -> None:
    """The default network untrained held out 5,035 and 5,031 of 6,000 right at 1e-3 and 1e-2 with
    AVX-512 kernels, 5,034 and 5,036 with AVX2 kernels: a tie the kernels' rounding broke either
    way, for test accuracies 1.05 points apart; its held-out losses did not tie. Scripted: 1e-2 and 1e-3 right on the same rows at margins 2 and 3, whose mean
    cross-entropies log(e^m + 2) - 0.9 m are 0.44 and 0.40; 1e-4 worse on both counts."""
    x, y = blobs(200, 3, 3, 0)
    margin = {1e-1: 1.0, 1e-2: 2.0, 1e-3: 3.0, 1e-4: 3.0}
    right = {1e-1: 0.8, 1e-2: 0.9, 1e-3: 0.9, 1e-4: 0.85}
    walked: list[float] = []

    def fake_fit(xf, yf, k, l2, max_iter=300, init=None, feature_dtype=torch.float32, stats=None):  # type: ignore[no-untyped-def]
        walked.append(l2)
        return ScriptedModel(l2, lambda l2, xv: scripted_logits(xv, x, y, right[l2], margin[l2]))

    monkeypatch.setattr(probe_module, "fit_logistic_regression", fake_fit)
    res = linear_probe(x, y, x, y, select_by=select_by)  # type: ignore[arg-type]
    chosen = 1e-3 if select_by == "loss" else 1e-2  # by accuracy the tie keeps the stronger penalty
    assert res.l2 == chosen and res.val_accuracy == pytest.approx(0.9)
    assert res.val_loss == pytest.approx(scripted_loss(0.9, 3, margin[chosen]), rel=1e-6)
    assert walked == ([1e-1, 1e-2, 1e-3, 1e-4] if select_by == "loss" else [1e-1, 1e-2, 1e-3]) + [chosen]
    assert [(l2, acc) for l2, acc, _ in res.path] == [(l2, right[l2]) for l2 in walked[:-1]]
    assert [loss for _, _, loss in res.path] == pytest.approx([scripted_loss(right[l2], 3, margin[l2])
                                                               for l2 in walked[:-1]], rel=1e-6)


def test_extract_features_is_eval_mode_and_leaves_the_encoder_untouched() -> None:
    enc = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    enc.train()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    x, _ = synthetic_images(37, 12)
    mean, std = torch.tensor([0.3]), torch.tensor([0.2])
    feats = extract_features(enc, x, mean, std, torch.device("cpu"), batch_size=8, precision=FP32, channels_last=False)
    assert enc.training  # restored
    for k, v in enc.state_dict().items():
        assert torch.equal(v, before[k])  # BatchNorm running statistics did not move
    enc.eval()
    direct = enc(prepare_images(torch.from_numpy(x), mean, std, 12))
    torch.testing.assert_close(feats, direct)
    assert feats.shape == (37, 4) and feats.dtype == torch.float32


@pytest.mark.parametrize("shortlist", [0, 2])
def test_knn_matches_brute_force_weighted_votes(shortlist: int) -> None:
    x, y = blobs(300, 8, 3, 2, spread=0.5)
    q, _ = blobs(40, 8, 3, 3, spread=0.5)
    k, tau = 7, 0.1
    pred = knn_predict(x, y, q, k, tau, 3, chunk=16, shortlist=shortlist)
    xn = x / x.norm(dim=1, keepdim=True)
    for i in range(len(q)):
        sims = [(float(xn[j] @ (q[i] / q[i].norm())), int(y[j])) for j in range(len(x))]
        sims.sort(key=lambda t: -t[0])
        votes = [0.0, 0.0, 0.0]
        for s, c in sims[:k]:
            votes[c] += float(np.exp(s / tau))
        assert int(pred[i]) == int(np.argmax(votes))


@pytest.mark.parametrize("tau", [0.005, 0.002])
def test_knn_votes_at_a_small_tau_match_exact_float64_votes(tau: float) -> None:
    # exp(s / tau) overflows float32 below tau 1/88.7; the votes are compared in float64 after
    # dividing every vote of a query by exp(s_max / tau), which cannot change its argmax
    x, y = blobs(300, 8, 3, 2, spread=0.5)
    q, _ = blobs(60, 8, 3, 3, spread=0.5)
    pred = knn_predict(x, y, q, 20, tau, 3)
    xn = (x / x.norm(dim=1, keepdim=True)).double()
    s = (q / q.norm(dim=1, keepdim=True)).double() @ xn.T
    top = s.topk(20, dim=1)
    votes = torch.zeros(len(q), 3, dtype=torch.float64).scatter_add_(
        1, y[top.indices], torch.exp((top.values - top.values[:, :1]) / tau))
    assert torch.equal(pred, votes.argmax(1))
    assert len(set(pred.tolist())) == 3  # not collapsed onto one class


@pytest.mark.parametrize("precision", [FP32, Precision("bf16", "test")])
def test_knn_breaks_ties_at_the_kth_place_in_row_order(precision: Precision, monkeypatch: pytest.MonkeyPatch) -> None:
    # 600 identical bank rows (duplicate images, or all-zero h): the k nearest are rows 0..k-1,
    # so the vote follows the labels of the first rows, not whatever subset topk returns. bf16's
    # shortlist is forced on, as on a CPU with bf16 units, whatever this CPU has
    import fastclr.evaluation.knn as knn

    monkeypatch.setattr(knn, "bf16_native_on", lambda device_type: True)
    bank = torch.ones(600, 4)
    labels = (torch.arange(600) < 20).long()
    for k in (5, 20, 100):
        _, rows = cosine_topk(bank, torch.ones(3, 4), k, precision)
        assert rows.tolist() == [list(range(k))] * 3
    assert knn_predict(bank, labels, torch.ones(2, 4), 20, precision=precision).tolist() == [1, 1]
    zeros = torch.zeros(50, 4)  # F.normalize maps them to 0: every similarity is 0
    assert cosine_topk(zeros, torch.ones(1, 4), 7, precision)[1].tolist() == [list(range(7))]


def test_knn_bf16_shortlist_gives_the_exact_fp32_votes_on_wide_features(monkeypatch: pytest.MonkeyPatch) -> None:
    # wide post-ReLU features in overlapping clusters, as h is: the bf16 shortlist of 2k
    # candidates, re-scored in fp32, must give the exact predictions (the shortlist forced on, as
    # on a CPU with bf16 units, and seen to run)
    import fastclr.evaluation.knn as knn

    x, y = blobs(3000, 512, 10, 5, spread=0.3)
    q, _ = blobs(500, 512, 10, 6, spread=0.3)
    x, q = torch.relu(x), torch.relu(q)
    exact = knn_predict(x, y, q, 20, 0.07, 10, shortlist=0)
    bf16, rescored = Precision("bf16", "test"), []
    real = knn._exact
    monkeypatch.setattr(knn, "_exact", lambda *a, **kw: rescored.append(len(a[1])) or real(*a, **kw))
    monkeypatch.setattr(knn, "bf16_native_on", lambda device_type: True)
    assert torch.equal(knn_predict(x, y, q, 20, 0.07, 10, shortlist=2, precision=bf16), exact)
    # The first chunk's shortlist rescored; most of its queries were unsure (a left-out row within
    # the bf16 product's error of their k-th), so the next chunk was searched exactly from the start.
    assert [n for n in rescored if n > 1] == [256]
    # A bf16 run whose features are on a CPU without bf16 units (a GPU run's evaluation on an AVX2
    # host) searches exactly: no emulated bf16 shortlist, only near ties ranked again.
    monkeypatch.setattr(knn, "bf16_native_on", lambda device_type: False)
    rescored.clear()
    assert torch.equal(knn_predict(x, y, q, 20, 0.07, 10, shortlist=2, precision=bf16), exact)
    assert all(n == 1 for n in rescored) and len(rescored) < len(q) / 2
    assert 0.2 < float((exact == blobs(500, 512, 10, 6, spread=0.3)[1]).float().mean()) < 1.0  # not a trivial problem


def test_knn_accuracy_on_identical_sets_with_k1_is_one() -> None:
    x, y = blobs(100, 5, 4, 4)
    assert knn_accuracy(x, y, x, y, k=1) == 1.0


def test_features_that_would_not_fit_in_memory_are_refused_before_allocating(monkeypatch: pytest.MonkeyPatch) -> None:
    from fastclr.errors import FastclrError
    from fastclr.evaluation.features import features_of
    from fastclr.models import EncoderSpec, SmallCNN

    enc = SmallCNN(1, 0.125, "32|256|flat0")  # 7 x 7 x 32 = 1568-d h
    spec = EncoderSpec("cnn", 1, 28, 0.125, "on", enc.feature_dim, (0.2,), (0.3,), "32|256|flat0")
    x, _ = synthetic_images(1000, 28)
    need = 3 * 1000 * 1568 * 4  # h and the probe's copies, float32
    monkeypatch.setattr("fastclr.runtime.available_memory", lambda: int(need / 0.9) - 1)
    with pytest.raises(FastclrError, match=r"h of 1000 images \(1568-d, with the probe's copies\) needs about 0.0 GiB "
                                           r"but 0.0 GiB are available; use a compact readout"):
        features_of(enc, spec, x, torch.device("cpu"), FP32)
    monkeypatch.setattr("fastclr.runtime.available_memory", lambda: int(need / 0.9) + 4096)
    assert features_of(enc, spec, x, torch.device("cpu"), FP32).shape == (1000, 1568)


def test_features_holding_nan_or_inf_are_one_line_not_chance_or_a_traceback() -> None:
    """NaN test features scored exactly the share of class 0 (argmax of NaN is 0), for the probe
    and kNN alike; NaN or inf training features failed inside L-BFGS."""
    from fastclr.errors import FastclrError
    from fastclr.evaluation.knn import knn_accuracy

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 8, generator=g), torch.arange(60) % 3
    bad = x.clone()
    bad[5, 2] = float("nan")
    bad[7, 0] = float("inf")
    for train_x, test_x, which in ((x, bad, "the test features"), (bad, x, "the training features")):
        with pytest.raises(FastclrError, match=f"{which} hold NaN or infinite values \\(2 of 60 rows\\)"):
            linear_probe(train_x, y, test_x, y)
    for train_x, test_x, which in ((x, bad, "the queries' features"), (bad, x, "the bank's features")):
        with pytest.raises(FastclrError, match=f"{which} hold NaN or infinite values"):
            knn_accuracy(train_x, y, test_x, y, k=5)


def test_knn_accuracy_weighs_votes_with_its_tau() -> None:
    """A query whose nearest neighbour (cosine 0.9) is of class 0 and whose next two (0.8 each) are
    of class 1: at tau 0.07 one vote of exp(0.9 / tau) outweighs two of exp(0.8 / tau), at tau 1
    it does not (float64 closed form), and knn_accuracy follows the tau it is given."""
    angles = torch.tensor([np.arccos(0.9), np.arccos(0.8), -np.arccos(0.8), np.pi], dtype=torch.float64)
    bank = torch.stack([angles.cos(), angles.sin()], 1).float()
    labels = torch.tensor([0, 1, 1, 0])
    query, truth = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    for tau in (0.07, 1.0):
        class0, class1 = np.exp(0.9 / tau), 2 * np.exp(0.8 / tau)
        want = float(class0 > class1)
        assert knn_accuracy(bank, labels, query, truth, k=3, tau=tau) == want
        assert int(knn_predict(bank, labels, query, 3, tau)[0]) == int(class1 > class0)
    assert {knn_accuracy(bank, labels, query, truth, k=3, tau=tau) for tau in (0.07, 1.0)} == {0.0, 1.0}


def test_a_k_beyond_the_bank_takes_every_row() -> None:
    """k larger than the bank: every bank row is a neighbour, most similar first, and all of them
    vote (here the two farther rows of class 1 outvote the nearest, of class 0, at tau 1; the
    nearest two alone would not)."""
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]])  # cosines 1, 0.8, 0.8
    sims, rows = cosine_topk(bank, torch.tensor([[1.0, 0.0]]), 5)
    want = sorted(range(3), key=lambda i: -float(bank[i, 0] / bank[i].norm()))
    assert rows.tolist() == [want] and sims.shape == (1, 3)
    votes = [0.0, 0.0]
    for i, c in enumerate([0, 1, 1]):
        votes[c] += float(np.exp(float(bank[i, 0] / bank[i].norm()) / 1.0))
    assert votes[1] > votes[0]
    assert knn_predict(bank, torch.tensor([0, 1, 1]), torch.tensor([[1.0, 0.0]]), k=10, tau=1.0).tolist() == [1]


def test_the_excluded_row_is_never_returned_from_a_bf16_shortlist(monkeypatch: pytest.MonkeyPatch) -> None:
    """Queries that are bank rows excluding themselves: with the bf16 shortlist (forced on, as on
    a CPU with bf16 units) as short as k, the query's own row may not take a shortlist place; the
    rows returned are those of the exact fp32 search."""
    monkeypatch.setattr("fastclr.evaluation.knn.bf16_native_on", lambda device_type: True)
    g = torch.Generator().manual_seed(2)
    bank = torch.randn(40, 6, generator=g)
    own = torch.arange(10)
    _, exact = cosine_topk(bank, bank[:10], 4, FP32, exclude=own)
    _, rows = cosine_topk(bank, bank[:10], 4, Precision("bf16", "test"), shortlist=1, exclude=own)
    assert all(i not in r for i, r in zip(own.tolist(), rows.tolist()))
    assert torch.equal(rows, exact)


def test_the_excluded_row_stays_out_when_near_ties_are_ranked_again() -> None:
    """A query excluding its own row, asked for as many neighbours as the bank holds, with two
    identical rows (a near tie, ranked again on recomputed similarities): the two real neighbours
    are returned, in row order, and the excluded row is not (neither by the search nor by the
    ranking again)."""
    bank = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.6, 0.8, 0.0]])
    sims, rows = cosine_topk(bank, bank[[0]], 3, FP32, exclude=torch.tensor([0]))
    assert rows.tolist() == [[1, 2]] and sims[0].tolist() == pytest.approx([0.6, 0.6])


@pytest.mark.parametrize("bf16", [False, True])
def test_a_k_beyond_the_bank_never_returns_the_excluded_row(monkeypatch: pytest.MonkeyPatch, bf16: bool) -> None:
    """Queries that are the bank's rows, each excluding its own, asked for more neighbours than the
    bank holds: each gets the n - 1 others, most similar first (a brute-force float64 ranking), in
    the exact search and the bf16 shortlist alike; a bank of one row gives no neighbour."""
    monkeypatch.setattr("fastclr.evaluation.knn.bf16_native_on", lambda device_type: bf16)
    precision = Precision("bf16", "test") if bf16 else FP32
    bank = torch.randn(5, 4, generator=torch.Generator().manual_seed(3))
    sims, rows = cosine_topk(bank, bank, 9, precision, exclude=torch.arange(5))
    unit = F.normalize(bank.double(), dim=1)
    cos = unit @ unit.T
    for i in range(5):
        want = sorted((j for j in range(5) if j != i), key=lambda j: -float(cos[i, j]))
        assert rows[i].tolist() == want
        assert sims[i].tolist() == pytest.approx([float(cos[i, j]) for j in want], abs=1e-6)
    sims, rows = cosine_topk(bank[:1], bank[:1], 3, precision, exclude=torch.tensor([0]))
    assert rows.shape == sims.shape == (1, 0)


def test_the_few_label_probe_chooses_l2_on_a_seeded_fifth_over_the_whole_short_grid(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """fewshot_fit as fastclr.evaluation.fewshot documents it: every penalty of the full probe's grid
    but its weakest is fitted (the walk does not stop at the first fall: held-out accuracy is coarse
    with few labels), on the class-balanced fifth that `stratified_folds` deals for the subset's seed
    held out, at the selection's iterations; the best is refitted on all rows at the final fit's,
    every fit standardised with the given statistics."""
    from fastclr.evaluation.fewshot import FEWSHOT_ITERS, fewshot_fit

    scripted = {1e-1: 0.8, 1e-2: 0.7, 1e-3: 0.9}  # a fall, then the best
    x, y = blobs(100, 3, 4, 0)
    given = (torch.zeros(3), torch.ones(3))
    fitted: list[tuple[float, int, int]] = []
    held_out: list[frozenset[int]] = []

    class Fake:
        def __init__(self, l2: float) -> None:
            self.l2 = l2

        def accuracy(self, xv: torch.Tensor, yv: torch.Tensor) -> float:
            return scripted[self.l2]

        def logits(self, xv: torch.Tensor) -> torch.Tensor:
            held_out.append(frozenset(int(i) for i in (xv[:, None, :] == x[None]).all(-1).nonzero()[:, 1]))
            return scripted_logits(xv, x, y, scripted[self.l2])

    def fake_fit(xf, yf, k, l2, max_iter=300, init=None, feature_dtype=torch.float32, stats=None):  # type: ignore[no-untyped-def]
        assert stats is given
        fitted.append((l2, len(xf), max_iter))
        return Fake(l2)

    monkeypatch.setattr(probe_module, "fit_logistic_regression", fake_fit)
    res = fewshot_fit(x, y, x, y, seed=7, stats=given)
    select, final = FEWSHOT_ITERS[1], FEWSHOT_ITERS[0]
    assert fitted == [(l2, 80, select) for l2 in sorted(L2_GRID[1:], reverse=True)] + [(1e-3, 100, final)]
    assert res.l2 == 1e-3
    fifth = frozenset(np.flatnonzero(stratified_folds(y.numpy(), 5, 7) == 0).tolist())
    assert held_out and all(rows == fifth for rows in held_out)
    assert fifth != frozenset(np.flatnonzero(stratified_folds(y.numpy(), 5, 0) == 0).tolist())


def test_the_bf16_shortlist_gives_the_exact_neighbours_of_features_nearly_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    """Features nearly collapsed (an early or short run): cosines all within 0.99-0.999 are two or
    three bf16 values, so the 2k shortlist was arbitrary, and `evaluate` read kNN 60.6% where the
    exact search read 84.8% (and flagged pretraining as harmful). Queries a left-out row could
    still beat are searched exactly: the rows are the exact search's, also where only some
    queries are unsure."""
    import fastclr.evaluation.knn as knn

    monkeypatch.setattr(knn, "bf16_native_on", lambda device_type: True)
    g = torch.Generator().manual_seed(5)
    centre = torch.randn(64, generator=g)
    bank = centre + 0.08 * torch.randn(600, 64, generator=g)  # every cosine near 0.997
    queries = torch.cat([centre + 0.08 * torch.randn(40, 64, generator=g), torch.randn(40, 64, generator=g)])
    cos = F.normalize(queries[:40], dim=1) @ F.normalize(bank, dim=1).T
    assert float(cos.min()) > 0.98  # the case: the bf16 values of these are a handful
    bf16 = Precision("bf16", "test")
    sims, rows = cosine_topk(bank, queries, 10, FP32)
    got_sims, got_rows = cosine_topk(bank, queries, 10, bf16, shortlist=2)
    # (the similarities of the two paths are the same sums formed in another order: ulps apart)
    assert torch.equal(got_rows, rows) and torch.allclose(got_sims, sims, rtol=0, atol=1e-6)
    labels = torch.arange(600) % 3
    assert torch.equal(knn_predict(bank, labels, queries, 20, 0.07, 3, shortlist=2, precision=bf16),
                       knn_predict(bank, labels, queries, 20, 0.07, 3, shortlist=0))


def test_held_out_loss_leaves_out_rows_of_a_class_the_fit_part_lacks() -> None:
    """A class with one image lands in the held-out fold alone: wrong at every penalty, its loss falls
    as the penalty grows whatever the features, and it would pull the choice to the strongest
    penalty. The path's losses are the cross-entropy of the other held-out rows, transcribed; its
    accuracies count every held-out row."""
    x, y = blobs(300, 5, 2, 3)
    x, y = torch.cat([x, torch.randn(1, 5) + 9.0]), torch.cat([y, torch.tensor([2])])  # class 2: one image
    fold = stratified_folds(y.numpy(), 10, 1)
    val, fit = torch.from_numpy(fold == 0), torch.from_numpy(fold != 0)
    assert bool(val[-1])  # the lone image is held out, its class absent from the fit part
    res = linear_probe(x, y, x, y, l2_grid=(1e-1, 1e-2), stop_early=False, seed=1)
    previous, want = None, []
    for l2 in (1e-1, 1e-2):
        previous = fit_logistic_regression(x[fit], y[fit], 3, l2, 50, init=previous)
        logits = previous.logits(x[val])
        seen = y[val] != 2
        want.append((l2, int((logits.argmax(1) == y[val]).sum()) / int(val.sum()),
                     float(F.cross_entropy(logits[seen].double(), y[val][seen]))))
    assert [p[0] for p in res.path] == [1e-1, 1e-2]
    for got, (_, acc, loss) in zip(res.path, want):
        assert got[1] == pytest.approx(acc, abs=1e-9) and got[2] == pytest.approx(loss, rel=1e-5)


def test_a_penalty_whose_held_out_loss_is_not_finite_ranks_last_and_the_walk_goes_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The strongest penalty's held-out logits overflow (NaN loss): the walk, which kept the first
    penalty only when a later one scored higher, stopped at once (NaN is never higher) and took the
    grid's first entry, the weakest penalty, never fitted as the selection's."""
    x, y = blobs(200, 3, 2, 0)

    def logits_of(l2: float, xv: torch.Tensor) -> torch.Tensor:
        out = scripted_logits(xv, x, y, {1e-1: 0.5, 1e-2: 0.9, 1e-3: 0.8, 1e-4: 0.7}[l2])
        return out * float("nan") if l2 == 1e-1 else out

    monkeypatch.setattr(probe_module, "fit_logistic_regression",
                        lambda xf, yf, k, l2, *a, **kw: ScriptedModel(l2, logits_of))
    res = linear_probe(x, y, x, y)
    assert res.l2 == 1e-2 and [p[0] for p in res.path] == [1e-1, 1e-2, 1e-3]
    assert np.isnan(res.path[0][2]) and res.val_loss == pytest.approx(scripted_loss(0.9, 2), rel=1e-6)
    with pytest.raises(ValueError, match="select_by is 'loss' or 'accuracy', not 'Loss'"):
        linear_probe(x, y, x, y, select_by="Loss")  # type: ignore[arg-type]


def test_a_probe_record_is_strict_json_with_null_for_what_is_undefined() -> None:
    """eval.json and probe.json: a probe with nothing held out (a grid of one penalty) wrote
    `"val_loss": NaN`, which strict JSON readers (jq, JavaScript) refuse, beside a val_accuracy of -1."""
    import json

    from fastclr.evaluation.probe import ProbeResult, probe_record

    x, y = blobs(60, 3, 2, 0)
    alone = probe_record(linear_probe(x, y, x, y, l2_grid=(1e-2,)))
    assert (alone["val_accuracy"], alone["val_loss"], alone["l2_path"], alone["l2"]) == (None, None, [], 1e-2)
    walked = probe_record(ProbeResult(0.9, 1e-2, 0.8, 0.95, 0.4, ((1e-1, 0.5, float("inf")), (1e-2, 0.8, 0.4))))
    assert (walked["val_accuracy"], walked["val_loss"], walked["l2_path"]) == (0.8, 0.4, [[1e-1, 0.5, None], [1e-2, 0.8, 0.4]])
    json.dumps([alone, walked], allow_nan=False)
