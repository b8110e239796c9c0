"""Learning-rate schedule (closed forms), batch-size scaling, LARS and parameter groups."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from fastclr.errors import FastclrError
from fastclr.pretraining.optim import LARS, build_optimizer, param_groups
from fastclr.pretraining.schedule import (FEW_EPOCHS, TimeBudget, decay_progress, few_epochs_warning, lr_at,
                                         ramp_fraction, scaled_lr, shortened_warmup, warmup_for)


def test_warmup_is_linear_and_reaches_the_peak() -> None:
    assert [lr_at(s, 100, 10, 1.0) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)


def test_cosine_closed_form_and_floor() -> None:
    for s in (10, 30, 55, 80, 99, 100, 150):
        progress = min(1.0, (s - 10) / 90)
        expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        assert lr_at(s, 100, 10, 1.0, min_ratio=0.1) == pytest.approx(expected)
    assert lr_at(100, 100, 10, 2.0) == pytest.approx(0.0, abs=1e-12)


def test_a_reanchored_cosine_goes_on_from_where_it_was_to_the_new_end() -> None:
    """Run of 100 steps (warm-up 10) lengthened to 160 at step 55: progress there is 0.5; after it,
    linear in the step from 0.5 to 1 over the 105 steps left, so the lr is continuous, falls, and
    ends at the floor; with no anchor, the one cosine from the warm-up (the closed form above)."""
    anchor = (55, decay_progress(55, 100, 10))
    assert anchor[1] == pytest.approx(0.5)
    assert lr_at(55, 160, 10, 1.0, anchor=anchor) == pytest.approx(lr_at(55, 100, 10, 1.0)) == pytest.approx(0.5)
    for s in (56, 90, 130, 159, 160):
        progress = 0.5 + 0.5 * (s - 55) / 105
        assert lr_at(s, 160, 10, 1.0, 0.1, anchor) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    assert lr_at(160, 160, 10, 1.0, anchor=anchor) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(70, 160, 10, 1.0) > lr_at(55, 100, 10, 1.0)  # the one cosine from the warm-up: back up


def test_a_warm_up_not_shorter_than_the_run_becomes_a_tenth_of_it() -> None:
    assert warmup_for(234, 808) == 234 and warmup_for(64, 65) == 64  # shorter than the run: as configured
    assert warmup_for(117, 65) == 6 and warmup_for(30, 12) == 1 and warmup_for(65, 65) == 6
    assert warmup_for(5, 1) == 1 and lr_at(0, 1, warmup_for(5, 1), 1.0) == 1.0  # one step, at the peak (it trained at 1/5)
    # the shortened warm-up's run reaches the peak and ends at the floor
    lrs = [lr_at(s, 65, warmup_for(117, 65), 1.0) for s in range(66)]
    assert max(lrs) == pytest.approx(1.0) and lrs[6] == pytest.approx(1.0) and lrs[65] == pytest.approx(0.0, abs=1e-12)


def test_few_epochs_are_flagged_below_the_threshold_only() -> None:
    line = few_epochs_warning(0.6, 9.5, 8607.4)
    assert line is not None and line.startswith("warning: only 0.6 epochs fit in 9.5 min at 8607 ms/step")
    assert few_epochs_warning(FEW_EPOCHS, 9.5, 100.0) is None and few_epochs_warning(32.4, 9.5, 75.0) is None
    almost = few_epochs_warning(FEW_EPOCHS - 0.01, 9.5, 100.0)
    assert almost is not None and almost.startswith("warning: only 4.9 epochs")  # never "5.0 epochs, too few"
    assert line.endswith(" or a GPU") and not str(few_epochs_warning(0.6, 9.5, 30.0, on_cpu=False)).endswith("GPU")
    for epochs, shown in ((0.1, "0.1"), (0.099, "0.09"), (0.04, "0.04"), (0.0042, "0.004"), (4e-5, "0.00004")):
        assert str(few_epochs_warning(epochs, 0.3, 5000.0)).startswith(f"warning: only {shown} epochs fit in 0.3 min")  # not 0.0, nor 4e-05


def test_a_warm_up_shortened_under_way_goes_on_from_where_it_is() -> None:
    """`shortened_warmup` at step s of a 100-step warm-up (share (s + 1) / 100) whose run now has
    `total` steps: the ramp ends at the run's tenth, or after a tenth of the steps left where that
    is later; either way it starts from the share reached, so no step's learning rate jumps."""
    assert shortened_warmup(0, 100, 62) == (6, None)  # at the start: a tenth of the run, the plain ramp
    assert shortened_warmup(3, 100, 62) == (9, (3, 0.04))  # the run's tenth (6) would leave 3 steps
    assert shortened_warmup(15, 100, 62) == (20, (15, 0.16))
    assert shortened_warmup(15, 200, 165) == (30, (15, 0.08))  # not (16, ...): 8% -> 100% in one step
    for total in range(16, 400):  # the ramp takes at least a tenth of the steps left, wherever the run's tenth is
        end, _ = shortened_warmup(15, 200, total)
        assert end - 15 >= (total - 15) / 10 and end <= max(total, 16)
    assert shortened_warmup(25, 100, 26) == (26, (25, 0.26))  # one step left: it reaches the peak at the end
    assert shortened_warmup(15, 10, 62) == (10, None) and shortened_warmup(5, 10, 62) == (10, None)  # nothing to shorten
    for step, total in ((3, 62), (15, 62), (40, 70)):
        end, ramp = shortened_warmup(step, 100, total)
        lrs = [lr_at(k, total, end, 1.0, ramp=ramp) for k in range(step, total)]
        assert lrs[0] == pytest.approx((step + 1) / 100)  # where the configured ramp was
        rises = [b - a for a, b in zip(lrs, lrs[1:]) if b > a]
        assert max(rises) == pytest.approx((1 - (step + 1) / 100) / (end - step))  # even steps up to the peak
        assert lrs[end - step] == pytest.approx(1.0) and lrs[-1] < 0.01
    # a second shortening goes on from the first one's ramp
    end, ramp = shortened_warmup(15, 100, 62)
    assert shortened_warmup(17, end, 18, ramp) == (18, (17, pytest.approx(0.16 + 0.84 * 2 / 5)))
    assert ramp_fraction(17, end, ramp) == pytest.approx(0.16 + 0.84 * 2 / 5)


def test_batch_size_scaling_rules() -> None:
    assert scaled_lr(0.3, 4096, "linear") == pytest.approx(4.8)  # SimCLR: 0.3 x 4096/256
    assert scaled_lr(0.075, 4096, "sqrt") == pytest.approx(4.8)  # 0.075 x sqrt(4096)
    assert scaled_lr(1e-3, 4096, "none") == 1e-3
    with pytest.raises(ValueError):
        scaled_lr(1.0, 2, "cubic")


def test_bn_and_bias_parameters_are_excluded_from_decay() -> None:
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    decay, no_decay = param_groups([m], 0.1)
    assert {id(p) for p in decay["params"]} == {id(m[0].weight), id(m[2].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(m[0].bias), id(m[1].weight), id(m[1].bias), id(m[2].bias)}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_lars_step_matches_the_formula() -> None:
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5, 3))
    b = nn.Parameter(torch.randn(5))
    w.grad, b.grad = torch.randn(5, 3), torch.randn(5)
    w0, b0, gw, gb = w.detach().clone(), b.detach().clone(), w.grad.clone(), b.grad.clone()
    opt = LARS([{"params": [w], "weight_decay": 0.01, "lars": True},
                {"params": [b], "weight_decay": 0.0, "lars": False}], lr=0.5, momentum=0.9, eta=0.001)
    opt.step()
    g = gw + 0.01 * w0
    trust = 0.001 * w0.norm() / g.norm()
    torch.testing.assert_close(w.detach(), w0 - 0.5 * trust * g)
    torch.testing.assert_close(b.detach(), b0 - 0.5 * gb)  # excluded: plain SGD, no decay
    # second step: momentum buffer = 0.9 * previous update direction + new one
    w.grad, b.grad = gw.clone(), gb.clone()
    w1 = w.detach().clone()
    opt.step()
    g1 = gw + 0.01 * w1
    buf = 0.9 * trust * g + 0.001 * w1.norm() / g1.norm() * g1
    torch.testing.assert_close(w.detach(), w1 - 0.5 * buf)


def test_lars_trusts_a_zero_weight_or_a_zero_gradient_as_one() -> None:
    """The trust ratio eta ||w|| / ||g|| is 0 for a zero-initialised matrix (it would never move) and
    0/0 where the gradient is zero too: LARS takes 1 there (You et al. 2017 leave it undefined; as
    SimCLR's implementation does). A zero weight moves by exactly lr * g; a zero gradient without
    decay leaves its weight as it is, without NaN."""
    zero, still = nn.Parameter(torch.zeros(5, 3)), nn.Parameter(torch.randn(5, 3, generator=torch.Generator().manual_seed(0)))
    g = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    zero.grad, still.grad = g.clone(), torch.zeros(5, 3)
    before = still.detach().clone()
    LARS([{"params": [zero, still], "weight_decay": 0.0, "lars": True}], lr=0.5, momentum=0.9, eta=0.001).step()
    torch.testing.assert_close(zero.detach(), -0.5 * g, rtol=0, atol=0)
    assert torch.equal(still.detach(), before)


def test_lars_puts_the_changing_learning_rate_inside_the_momentum() -> None:
    # You et al. 2017, Algorithm 1 (and SimCLR's LARS): v <- m v + lr_t * trust * (g + wd w); w <- w - v,
    # transcribed in float64 over a warm-up whose rate changes every step.
    torch.manual_seed(1)
    w = nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
    grads = [torch.randn(6, 4, dtype=torch.float64) for _ in range(5)]
    rates = [0.1, 0.3, 0.5, 0.7, 0.9]
    opt = LARS([{"params": [w], "weight_decay": 0.01, "lars": True}], lr=rates[0], momentum=0.9, eta=0.001)
    ref, v = w.detach().clone(), torch.zeros(6, 4, dtype=torch.float64)
    for lr, g in zip(rates, grads):
        for group in opt.param_groups:
            group["lr"] = lr
        w.grad = g.clone()
        opt.step()
        d = g + 0.01 * ref
        v = 0.9 * v + lr * (0.001 * ref.norm() / d.norm()) * d
        ref = ref - v
    torch.testing.assert_close(w.detach(), ref, rtol=1e-12, atol=1e-12)


def test_lars_state_saved_with_the_rate_outside_the_momentum_resumes_the_same_updates() -> None:
    # Earlier checkpoints kept buffer b with the update lr * b; loaded now, the buffer becomes lr * b,
    # so at a constant rate (where both forms agree) the continued run is the one it would have been.
    torch.manual_seed(2)
    grads = [torch.randn(3, 3, dtype=torch.float64) for _ in range(4)]
    w = nn.Parameter(torch.randn(3, 3, dtype=torch.float64))
    opt = LARS([{"params": [w], "weight_decay": 0.0, "lars": False}], lr=0.4, momentum=0.9)
    for g in grads[:2]:
        w.grad = g.clone()
        opt.step()
    saved = opt.state_dict()
    earlier = {"state": {0: {"momentum_buffer": saved["state"][0]["momentum_buffer"] / 0.4}},
               "param_groups": [{k: v for k, v in saved["param_groups"][0].items() if k != "lr_in_momentum"}]}
    w2 = nn.Parameter(w.detach().clone())
    opt2 = LARS([{"params": [w2], "weight_decay": 0.0, "lars": False}], lr=0.4, momentum=0.9)
    opt2.load_state_dict(earlier)
    for g in grads[2:]:
        w.grad, w2.grad = g.clone(), g.clone()
        opt.step()
        opt2.step()
    torch.testing.assert_close(w2.detach(), w.detach(), rtol=1e-12, atol=1e-12)
    assert opt2.param_groups[0]["lr_in_momentum"]


def _conv_bn_linear(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3, 2)).to(dtype)


@pytest.mark.parametrize("name, shrink", [("adamw", 1 - 0.1 * 0.5), ("sgd", 1 - 0.1 * 0.5), ("lars", 1 - 0.1 * 1e-3)])
def test_a_built_optimiser_decays_the_weights_only(name: str, shrink: float) -> None:
    """One step with every gradient zero is decay alone, in closed form: AdamW's decoupled decay
    and SGD's w - lr * wd * w both give w (1 - lr wd); LARS's trust ratio eta ||w|| / ||wd w||
    turns it into w (1 - lr eta). BatchNorm and bias parameters do not move at all."""
    m = _conv_bn_linear()
    opt = build_optimizer(name, [m], lr=0.1, weight_decay=0.5, eta=1e-3)
    before = {k: p.detach().clone() for k, p in m.named_parameters()}
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for k, p in m.named_parameters():
        if p.ndim > 1:
            torch.testing.assert_close(p.detach(), before[k] * shrink, rtol=1e-6, atol=0)
        else:
            assert torch.equal(p.detach(), before[k]), k


def test_sgd_and_adamw_steps_are_their_formulas_in_float64() -> None:
    """Two steps with fixed gradients against a transcription: SGD with momentum 0.9 (weight decay
    added to the gradient, as torch's SGD), and AdamW (Loshchilov & Hutter 2019; betas 0.9 / 0.999,
    eps 1e-8, decay decoupled), each for a decayed weight and an undecayed bias."""
    lr, wd = 0.1, 0.5
    g = torch.Generator().manual_seed(4)
    grads = [(torch.randn(2, 3, dtype=torch.float64, generator=g), torch.randn(2, dtype=torch.float64, generator=g))
             for _ in range(2)]
    for name in ("sgd", "adamw"):
        m = nn.Linear(3, 2).to(torch.float64)
        start = [m.weight.detach().clone(), m.bias.detach().clone()]
        opt = build_optimizer(name, [m], lr=lr, weight_decay=wd)
        for gw, gb in grads:
            m.weight.grad, m.bias.grad = gw.clone(), gb.clone()
            opt.step()
        for i, (w, decay) in enumerate(zip(start, (wd, 0.0))):
            w = w.clone()
            v = mom = torch.zeros_like(w)
            for t, pair in enumerate(grads, start=1):
                grad = pair[i]
                if name == "sgd":
                    d = grad + decay * w
                    v = d if t == 1 else 0.9 * v + d
                    w = w - lr * v
                else:
                    mom, v = 0.9 * mom + 0.1 * grad, 0.999 * v + 0.001 * grad * grad
                    w = w * (1 - lr * decay)
                    w = w - lr * (mom / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)
            torch.testing.assert_close((m.weight, m.bias)[i].detach(), w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["adamw", "sgd", "lars"])
def test_an_optimiser_loaded_from_its_state_goes_on_as_the_one_that_saved_it(name: str) -> None:
    """What a checkpoint does to the optimiser: its state_dict loaded into a fresh one, mid-run, after
    the learning rate moved, gives the same next updates, bit for bit."""
    g = torch.Generator().manual_seed(5)
    grads = [[torch.randn(p.shape, generator=g) for p in _conv_bn_linear().parameters()] for _ in range(4)]
    a, b = _conv_bn_linear(), _conv_bn_linear()
    opt_a = build_optimizer(name, [a], lr=0.1, weight_decay=0.01)
    for step, gs in enumerate(grads):
        if step == 2:
            b.load_state_dict(a.state_dict())
            opt_b = build_optimizer(name, [b], lr=0.1, weight_decay=0.01)
            saved = io.BytesIO()  # through bytes, as a checkpoint: a live state_dict shares the buffers
            torch.save(opt_a.state_dict(), saved)
            saved.seek(0)
            opt_b.load_state_dict(torch.load(saved, weights_only=True))
        for opt in (opt_a, opt_b) if step >= 2 else (opt_a,):
            for group in opt.param_groups:
                group["lr"] = 0.1 * (step + 1)  # a warm-up: the rate differs at every step
        for model in (a, b) if step >= 2 else (a,):
            for p, grad in zip(model.parameters(), gs):
                p.grad = grad.clone()
        opt_a.step()
        if step >= 2:
            opt_b.step()
    for (k, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p.detach(), q.detach()), k


def test_lars_under_loss_scaling_updates_as_without_it_or_not_at_all() -> None:
    """With the scaler's flags (`found_inf`, and `grad_scale` while gradients are still scaled)
    LARS makes the very update it makes without them, or none where an overflow was found,
    its momentum untouched; a first step skipped leaves the next one as a first step."""
    g = torch.Generator().manual_seed(6)
    grads = [[torch.randn(p.shape, generator=g) for p in _conv_bn_linear().parameters()] for _ in range(3)]
    plain, flagged = _conv_bn_linear(), _conv_bn_linear()
    opt_p = build_optimizer("lars", [plain], lr=0.1, weight_decay=0.01)
    opt_f = build_optimizer("lars", [flagged], lr=0.1, weight_decay=0.01)
    opt_f.found_inf = torch.ones(())  # type: ignore[attr-defined]  # the first step overflowed: skipped
    for p, grad in zip(flagged.parameters(), grads[0]):
        p.grad = grad * float("inf")
    opt_f.step()
    assert all(torch.equal(p, q) for p, q in zip(flagged.parameters(), _conv_bn_linear().parameters()))
    for gs in grads[1:]:
        opt_f.found_inf, opt_f.grad_scale = torch.zeros(()), torch.full((), 8.0)  # type: ignore[attr-defined]
        for p, q, grad in zip(plain.parameters(), flagged.parameters(), gs):
            p.grad, q.grad = grad.clone(), grad * 8.0
        opt_p.step()
        opt_f.step()
        for (k, p), q in zip(plain.named_parameters(), flagged.parameters()):
            assert torch.equal(p.detach(), q.detach()), k
    kept = {k: v.clone() for k, v in flagged.state_dict().items()}
    buffers = [opt_f.state[p]["momentum_buffer"].clone() for p in flagged.parameters()]
    opt_f.found_inf = torch.ones(())  # type: ignore[attr-defined]
    opt_f.step()
    assert all(torch.equal(v, kept[k]) for k, v in flagged.state_dict().items())
    assert all(torch.equal(opt_f.state[p]["momentum_buffer"], b) for p, b in zip(flagged.parameters(), buffers))


def test_build_optimizer_names() -> None:
    m = nn.Linear(3, 3)
    assert isinstance(build_optimizer("adamw", [m], 1e-3, 0.1), torch.optim.AdamW)
    assert isinstance(build_optimizer("sgd", [m], 1e-3, 0.1), torch.optim.SGD)
    assert isinstance(build_optimizer("lars", [m], 1e-3, 0.1), LARS)
    with pytest.raises(FastclrError, match="choose one of: adamw, sgd, lars"):
        build_optimizer("adam2", [m], 1e-3, 0.1)


def test_time_budget_first_fit_is_the_closed_form_for_a_steady_pace() -> None:
    # 0.5 s for the first 5 steps (warm-up), then 0.2 s: steps 5..15 give pace 0.2 exactly
    b = TimeBudget(600.0)
    for s in range(1, 16):
        b.observe(s, 0.5 * min(s, 5) + 0.2 * max(s - 5, 0))
    assert b.pace(15, 4.5) == pytest.approx(0.2)
    assert b.fit(15, 4.5, first=True) == 15 + int((600.0 - 4.5) / 0.2)  # 2992


def test_a_resumed_time_budget_paces_the_steps_of_its_own_process() -> None:
    # steps 0..100 ran at 1 s; resumed at step 100 on a machine twice as fast, whose first 5 steps
    # cost 2 s each: the refit at step 125 divides by the 20 steady steps since step 105 only
    b = TimeBudget(600.0)
    b.resume_at(100)
    seconds = {s: 100.0 + 2.0 * min(s - 100, 5) + 0.5 * max(s - 105, 0) for s in range(101, 126)}
    for s, t in seconds.items():
        b.observe(s, t)
    assert b.pace(125, seconds[125]) == pytest.approx(0.5)
    assert b.fit(125, seconds[125], first=False) == 125 + int((600.0 - 120.0) / 0.5)  # 1085
    assert TimeBudget(600.0).pace(125, seconds[125]) == pytest.approx(120.0 / 125)  # paced from step 0


def test_time_budget_refits_are_due_every_25_steps_and_at_epoch_ends_before_the_end() -> None:
    b = TimeBudget(570.0)
    assert [s for s in range(14, 80) if b.due(s, 60, s % 50 == 0)] == [15, 25, 50]  # not at or after the end
    assert not b.due(15, 2000, False, fitted=True)  # a resumed run keeps its fitted count until a refit
    b.resume_at(40)  # a process resumed at step 40 fits first at 55, on the pace of its own steps 45-55
    assert [s for s in range(40, 80) if b.due(s, 2000, False)] == [55, 75]
    assert [s for s in range(40, 80) if b.due(s, 2000, False, fitted=True)] == [75]


def test_time_budget_spent_ends_the_run_at_the_next_fit() -> None:
    b = TimeBudget(10.0)
    b.observe(5, 1.0)
    assert b.fit(15, 3.0, first=True) == 15 + int(7.0 / 0.2)
    assert b.fit(200, 10.5, first=False) == 200  # refit after the budget is spent: stop now
    assert b.fit(15, 12.0, first=True) == 15  # a first fit after the process's first step grants what is left
    assert TimeBudget(10.0).fit(1, 12.0, first=True) == 2  # at its first step (that step spent it): one more
    b.resume_at(40)  # a resumed process's refit owed before its first fit (step 55) may end the run too
    assert b.fit(40, 12.0, first=False) == 40
    with pytest.raises(ValueError):
        TimeBudget(0.0)
