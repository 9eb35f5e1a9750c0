"""biomass.losses and biomass.schedulers: every registered loss and scheduler against its own formula or shape."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from biomass.constants import TARGET_WEIGHTS
from biomass.errors import ConfigError
from biomass.metrics import r2_weighted_rows
from biomass.models.model import TargetSpace
from biomass.registry import LOSSES, SCHEDULERS


# --------------------------------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("name", LOSSES.names())
@pytest.mark.parametrize("n_targets", [5, 2])
def test_loss_finite_scalar_with_gradient(name, n_targets):
    loss = LOSSES.build(name, n_targets)
    if hasattr(loss, "bind"):  # interval bins come from the model's target space (build_stage_model binds it)
        loss.bind(TargetSpace(n_targets, bins=loss.bins))
    k = loss.outputs_per_target
    torch.manual_seed(0)
    raw = torch.randn(6, n_targets * k, requires_grad=True)
    target = torch.randn(6, n_targets)
    value = loss(raw, target)
    assert value.ndim == 0 and torch.isfinite(value)
    value.backward()
    assert raw.grad is not None and torch.isfinite(raw.grad).all() and raw.grad.abs().sum() > 0
    assert loss.point(raw).shape == (6, n_targets)
    expected_w = TARGET_WEIGHTS if n_targets == 5 else (1.0,) * n_targets
    assert torch.allclose(loss.weights, torch.tensor(expected_w))


@pytest.mark.parametrize("name", LOSSES.names())
def test_loss_weight_count_checked(name):
    with pytest.raises(ConfigError, match="3 values for 5 targets"):
        LOSSES.build(name, 5, weights=(1.0, 1.0, 1.0))


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_smooth_l1_equals_torch(beta):
    pred, target = torch.randn(8, 5) * 2, torch.randn(8, 5)
    loss = LOSSES.build("weighted_smooth_l1", 5, weights=(1.0,) * 5, beta=beta)
    torch.testing.assert_close(loss(pred, target), F.smooth_l1_loss(pred, target, beta=beta))


def test_mse_equals_torch():
    pred, target = torch.randn(8, 2) * 2, torch.randn(8, 2)
    torch.testing.assert_close(LOSSES.build("mse", 2, weights=(1.0, 1.0))(pred, target), F.mse_loss(pred, target))


@pytest.mark.parametrize("name, elementwise", [
    ("weighted_smooth_l1", lambda p, t: F.smooth_l1_loss(p, t, reduction="none")),
    ("mse", lambda p, t: (p - t) ** 2),
    ("log_cosh", lambda p, t: torch.log(torch.cosh(p - t))),
])
def test_weighting_is_mean_of_weighted_terms(name, elementwise):
    torch.manual_seed(1)
    pred, target = torch.randn(7, 5) * 2, torch.randn(7, 5)
    w = torch.tensor([0.3, 0.0, 1.0, 2.0, 0.5])
    got = LOSSES.build(name, 5, weights=tuple(w.tolist()))(pred, target)
    torch.testing.assert_close(got, (elementwise(pred, target) * w).sum() / pred.numel())
    default = LOSSES.build(name, 5)(pred, target)  # the metric's weights by default
    torch.testing.assert_close(default, (elementwise(pred, target) * torch.tensor(TARGET_WEIGHTS)).mean())


def test_log_cosh_matches_definition():
    x = torch.linspace(-6, 6, 49).view(7, 7)
    loss = LOSSES.build("log_cosh", 7, weights=(1.0,) * 7)
    torch.testing.assert_close(loss.elementwise(x, torch.zeros_like(x)), torch.log(torch.cosh(x)), rtol=1e-5,
                               atol=1e-6)
    big = torch.tensor([[200.0, -300.0]])
    value = LOSSES.build("log_cosh", 2)(big, torch.zeros_like(big))
    assert torch.isfinite(value)  # torch.log(torch.cosh(300)) overflows; the stable form does not
    torch.testing.assert_close(value, torch.tensor((200 + 300 - 2 * math.log(2)) / 2))


def test_quantile_point_is_the_median_column():
    loss = LOSSES.build("quantile", 5, quantiles=(0.1, 0.5, 0.9))
    assert loss.outputs_per_target == 3
    raw = torch.arange(2 * 15, dtype=torch.float32).view(2, 15)  # per target: (q0.1, q0.5, q0.9) side by side
    assert torch.equal(loss.point(raw), raw[:, 1::3])
    loss2 = LOSSES.build("quantile", 2, quantiles=(0.5, 0.25))
    assert torch.equal(loss2.point(raw[:, :4]), raw[:, [0, 2]])


def test_pinball_hand_computation():
    qs = (0.1, 0.5, 0.9)
    w = (1.0, 3.0)
    loss = LOSSES.build("quantile", 2, weights=w, quantiles=qs)
    raw = torch.tensor([[0.0, 1.0, 2.0, -1.0, 0.0, 4.0], [3.0, 3.0, 3.0, 0.5, 1.5, 2.5]])
    target = torch.tensor([[1.5, 2.0], [1.0, 0.5]])
    total = 0.0
    for b in range(2):
        for j in range(2):
            per_q = []
            for m, q in enumerate(qs):
                d = float(target[b, j] - raw[b, j * 3 + m])
                per_q.append(q * d if d >= 0 else (q - 1) * d)
            total += w[j] * sum(per_q) / len(qs)
    torch.testing.assert_close(loss(raw, target), torch.tensor(total / 4))


def test_quantiles_must_include_the_median():
    with pytest.raises(ConfigError, match="include 0.5"):
        LOSSES.build("quantile", 5, quantiles=(0.1, 0.9))
    with pytest.raises(ConfigError, match="lie in"):
        LOSSES.build("quantile", 5, quantiles=(0.0, 0.5))


@pytest.mark.parametrize("weights", [None, (1.0,) * 5, (0.5, 1.0, 0.1, 2.0, 0.3)])
def test_r2_loss_is_one_minus_weighted_r2(weights):
    torch.manual_seed(2)
    target = torch.randn(9, 5) * 3
    pred = target + torch.randn(9, 5)
    loss = LOSSES.build("r2", 5, weights=weights)
    w = np.broadcast_to(np.asarray(weights or TARGET_WEIGHTS), (9, 5))
    expected = 1.0 - r2_weighted_rows(target.numpy(), pred.numpy(), w)
    assert float(loss(pred, target)) == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------------------------------- schedulers
def _cosine(lr0: float, eta_min: float, t: int, period: int) -> float:
    return eta_min + (lr0 - eta_min) * (1 + math.cos(math.pi * t / period)) / 2


# Each scheduler's own learning-rate shape over a 10-epoch stage from lr 1e-3, epoch by epoch (the lr each epoch
# trains at), with the validation loss a plateau scheduler is stepped with: flat for 6 epochs, then improving.
LR0, EPOCHS = 1e-3, 10
VAL_LOSS = [1.0] * 6 + [0.5, 0.4, 0.3, 0.2]
LR_SHAPES = {
    "cosine": ({"eta_min": 1e-5}, [_cosine(LR0, 1e-5, e, EPOCHS) for e in range(EPOCHS)]),
    "cosine_warm_restarts": ({"T_0": 4, "T_mult": 2, "eta_min": 1e-6},
                             [_cosine(LR0, 1e-6, e if e < 4 else e - 4, 4 if e < 4 else 8) for e in range(EPOCHS)]),
    # the first loss sets the best; the 3rd flat epoch after it (patience 2 exceeded) halves the lr; 2 more flat
    # epochs stay within patience and the improving losses after them leave it alone
    "plateau": ({"factor": 0.5, "patience": 2}, [LR0] * 4 + [LR0 / 2] * 6),
    "constant": ({}, [LR0] * EPOCHS),
}


def test_every_scheduler_has_its_shape_checked():
    assert set(LR_SHAPES) == set(SCHEDULERS.names())


@pytest.mark.parametrize("name", sorted(LR_SHAPES))
def test_scheduler_follows_its_own_lr_shape(name):
    """Stepped once per epoch as training steps it (`FoldTrainer.step_scheduler`): the lr of every epoch is the
    scheduler's own curve, so a scheduler that never changes the lr (or changes it wrongly) fails."""
    kwargs, expected = LR_SHAPES[name]
    param = nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([param], lr=LR0)
    sched = SCHEDULERS.build(name, opt, EPOCHS, **kwargs)
    seen = []
    for epoch in range(EPOCHS):
        seen.append(opt.param_groups[0]["lr"])
        opt.zero_grad()
        param.square().sum().backward()
        opt.step()
        sched.step(VAL_LOSS[epoch]) if name == "plateau" else sched.step()
    np.testing.assert_allclose(seen, expected, rtol=1e-9, atol=0)


def test_plateau_reduces_on_a_flat_loss():
    opt = torch.optim.AdamW([nn.Parameter(torch.ones(1))], lr=1e-3)
    sched = SCHEDULERS.build("plateau", opt, 4, factor=0.5, patience=2)
    for _ in range(4):
        sched.step(1.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)


def test_cosine_warm_restarts_reproduces_torch():
    def lrs(make):
        opt = torch.optim.AdamW([nn.Parameter(torch.ones(1))], lr=5e-5)
        sched = make(opt)
        out = []
        for _ in range(20):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    ours = lrs(lambda o: SCHEDULERS.build("cosine_warm_restarts", o, 20))  # defaults are the seed's 10, 2, 1e-6
    theirs = lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=10, T_mult=2, eta_min=1e-6))
    assert ours == theirs
    closed = [1e-6 + (5e-5 - 1e-6) * (1 + math.cos(math.pi * (e if e < 10 else e - 10) / (10 if e < 10 else 20))) / 2
              for e in range(20)]
    np.testing.assert_allclose(ours, closed, rtol=1e-9)


def test_cosine_spans_the_stage_epochs():
    # one cycle over train.epochs: the same per-epoch lrs as warm restarts with T_0 = epochs, T_mult = 1
    def lrs(make, epochs=12):
        opt = torch.optim.AdamW([nn.Parameter(torch.ones(1))], lr=3e-3)
        sched = make(opt)
        out = []
        for _ in range(epochs):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    ours = lrs(lambda o: SCHEDULERS.build("cosine", o, 12, eta_min=1e-5))
    restarts = lrs(lambda o: SCHEDULERS.build("cosine_warm_restarts", o, 12, T_0=12, T_mult=1, eta_min=1e-5))
    np.testing.assert_allclose(ours, restarts, rtol=1e-9)
    assert ours[0] == 3e-3 and ours[-1] < ours[len(ours) // 2] < ours[0]
