"""Loss and solver formulas against hand-computed values (dcm-method.md §2, §5.2, §6.2)."""

from __future__ import annotations

import math

import pytest
import torch

from dcm_core.flow import flow_step, renoise
from dcm_core.schedule import pcm_grid
from dcm_core.train.losses import feature_matching, hinge_d_loss, hinge_g_loss, pseudo_huber, temporal_coherence
from dcm_core.train.solver import PCMSolver, cfg_velocity, renoise_coefficients


def test_pseudo_huber_hand_values():
    pred = torch.tensor([0.0, 0.003, -0.004, 1.0])
    target = torch.zeros(4)
    c = 0.001
    hand = [0.0, math.sqrt(0.003**2 + c * c) - c, math.sqrt(0.004**2 + c * c) - c, math.sqrt(1 + c * c) - c]
    assert pseudo_huber(pred, target, c).item() == pytest.approx(sum(hand) / 4, rel=1e-5)
    # c scales the quadratic region: |d| << c → d²/(2c)
    assert pseudo_huber(torch.tensor([1e-5]), torch.zeros(1), c).item() == pytest.approx(1e-10 / (2 * c), rel=2e-2)  # fp32 cancellation


def test_temporal_coherence_hand_values_and_skip():
    # B=1, C=1, T=5, H=W=1: frame values 0,1,2,3,4 vs 0,0,0,0,0
    pred = torch.arange(5.0).view(1, 1, 5, 1, 1)
    target = torch.zeros(1, 1, 5, 1, 1)
    # stride 3 differences: pred[3]-pred[0] = 3, pred[4]-pred[1] = 3; target diffs 0 → MSE = 9
    assert temporal_coherence(pred, target, 3).item() == pytest.approx(9.0)
    assert temporal_coherence(pred, target, 1).item() == pytest.approx(1.0)
    short = torch.randn(2, 16, 3, 4, 4)
    assert temporal_coherence(short, torch.zeros_like(short), 3).item() == 0.0  # T ≤ 3: skipped
    with pytest.raises(ValueError, match=r"expects \[B, C, T, H, W\] latents, got shape \(1, 2, 3\)"):
        temporal_coherence(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3))


def test_hinge_losses_hand_values():
    f1 = torch.tensor([[0.5, -2.0]])  # relu(1-f) = [0.5, 3.0] → 1.75 ; relu(1+f) = [1.5, 0] → 0.75
    f2 = torch.tensor([[3.0]])  # relu(1-f) = 0 ; relu(1+f) = 4
    r1 = torch.tensor([[2.0, 0.0]])  # relu(1-r) = [0, 1] → 0.5
    r2 = torch.tensor([[-1.0]])  # relu(1-r) = 2
    assert hinge_g_loss([f1, f2]).item() == pytest.approx((1.75 + 0.0) / 2)
    assert hinge_d_loss([f1, f2], [r1, r2]).item() == pytest.approx(((0.75 + 0.5) + (4.0 + 2.0)) / 2)
    with pytest.raises(ValueError, match=r"as many real as fake head outputs \(got 2 real, 1 fake\)"):
        hinge_d_loss([f1], [r1, r2])


def test_feature_matching_is_mse_over_the_stack():
    a = [torch.ones(1, 2, 1, 1, 1), torch.zeros(1, 2, 1, 1, 1)]
    b = [torch.zeros(1, 2, 1, 1, 1), torch.zeros(1, 2, 1, 1, 1)]
    assert feature_matching(a, b).item() == pytest.approx(0.5)  # 2 of 4 elements differ by 1


def test_renoise_coefficients_and_flow_renoise():
    end = pcm_grid().sigmas_prev[0]
    sa = 0.5
    a, b = renoise_coefficients(sa, end)
    assert a == pytest.approx((1 - sa) / (1 - end))
    assert b == pytest.approx((sa - end) / (1 - end))
    x, n = torch.tensor([2.0]), torch.tensor([-1.0])
    assert renoise(x, n, end, sa).item() == pytest.approx(a * 2.0 + b * -1.0, rel=1e-6)
    # re-noising to σ_end itself is the identity
    assert renoise(x, n, end, end).item() == pytest.approx(2.0, rel=1e-6)


def test_cfg_velocity_official_sense():
    vc, vu = torch.tensor([1.0]), torch.tensor([0.5])
    assert cfg_velocity(vc, vu, 5.0).item() == pytest.approx(1.0 + 5.0 * 0.5)  # = 6·vc − 5·vu
    assert cfg_velocity(vc, vu, 0.0).item() == 1.0


def test_solver_grid_ranges_and_boundaries():
    sem = PCMSolver("semantic", 35)
    det = PCMSolver("detail", 35)
    assert sem.index_range == (35, 50) and det.index_range == (0, 35)
    assert sem.sigma_boundary == pytest.approx(0.975410, abs=1e-6)
    assert det.sigma_boundary == pytest.approx(0.016732, abs=1e-6)
    assert PCMSolver("semantic", 38).sigma_boundary == pytest.approx(0.981763, abs=1e-6)
    assert det.adv_index_range == (0, 35)
    g = torch.Generator().manual_seed(0)
    ks = torch.cat([sem.draw(64, g).index for _ in range(20)])
    assert int(ks.min()) == 35 and int(ks.max()) == 49
    ks = torch.cat([det.draw(64, g).index for _ in range(20)])
    assert int(ks.min()) == 0 and int(ks.max()) == 34
    adv = torch.cat([det.draw_adv_index(64, g) for _ in range(20)])
    assert int(adv.min()) == 0 and int(adv.max()) == 34


def test_solver_consistency_arithmetic_matches_flow():
    sem = PCMSolver("semantic", 35)
    g = torch.Generator().manual_seed(1)
    draw = sem.draw(3, g)
    x = torch.randn(3, 2, 5, 2, 2, generator=g)
    v = torch.randn(3, 2, 5, 2, 2, generator=g)
    pred = sem.student_prediction(x, v, draw)
    for i in range(3):
        hand = x[i] + (sem.sigma_boundary - float(draw.sigma[i])) * v[i]
        torch.testing.assert_close(pred[i], hand)
    x_prev = sem.teacher_step(x, v, draw)
    torch.testing.assert_close(x_prev, flow_step(x, v, draw.sigma, draw.sigma_prev))
    # boundary condition: at k = K0 the target is x' itself
    k0 = torch.full((1,), 35)
    from dcm_core.train.solver import IndexDraw

    d0 = IndexDraw(k0, sem.sigmas[k0], sem.sigmas_prev[k0], sem.sigma_boundary)
    xp = torch.randn(1, 2, 5, 2, 2)
    torch.testing.assert_close(sem.target(xp, torch.randn_like(xp), d0), xp)


def test_adversarial_pair_shares_the_noise():
    det = PCMSolver("detail", 35)
    fake, real = torch.randn(2, 4), torch.randn(2, 4)
    n = torch.randn(2, 4)
    sa = det.adv_sigma(torch.tensor([3, 20]))
    f, r = det.adversarial_pair(fake, real, n, sa)
    a, b = renoise_coefficients(sa.view(-1, 1), det.sigma_boundary)
    torch.testing.assert_close(f, a * fake + b * n)
    torch.testing.assert_close(r, a * real + b * n)
    # same noise: the difference carries no noise at all
    torch.testing.assert_close(f - r, a * (fake - real))
