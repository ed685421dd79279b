"""Samplers against analytic flow fields."""

import pytest
import torch

from flgengine.sampling import EulerSampler, FewStepSampler, euler_sigmas, shift_sigmas

MU, S = 1.5, 0.5  # data ~ N(MU, S^2) per element


def gaussian_velocity(x, t, context):
    """Exact marginal velocity E[eps - x0 | x_t] for x0 ~ N(MU, S^2), x_t = (1-s) x0 + s eps.

    Called with t in timestep units (s * 1000)."""
    s = (t.double() / 1000).view(-1, *([1] * (x.dim() - 1)))
    var = (1 - s) ** 2 * S**2 + s**2
    cov = s - (1 - s) * S**2
    return (-MU + cov / var * (x.double() - (1 - s) * MU)).to(x.dtype)


def _euler_error(steps, shift=1.0):
    eps = torch.randn(4, 1, 1, 8, 8, dtype=torch.float64)
    out = EulerSampler(steps, shift, guidance=1.0).sample(gaussian_velocity, eps, torch.zeros(4, 1, 1))
    exact = MU + S * eps  # the probability-flow ODE maps eps to MU + S * eps
    return (out - exact).abs().max().item()


def test_euler_error_shrinks_with_steps_and_converges():
    errs = [_euler_error(n) for n in (2, 4, 8, 32, 128)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.03
    assert errs[-1] / errs[-2] < 0.35  # first order: 4x the steps, ~1/4 the error
    shifted = [_euler_error(n, shift=5.0) for n in (32, 128, 512)]
    assert shifted[2] < shifted[1] / 3 < shifted[0] / 9 and shifted[2] < 0.02


def test_sigma_schedule():
    s = euler_sigmas(4, 1.0)
    assert torch.allclose(s, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    sh = shift_sigmas(torch.tensor([0.0, 0.5, 1.0]), 5.0)
    assert torch.allclose(sh, torch.tensor([0.0, 5 / 6, 1.0]))


def test_cfg_combines_cond_and_uncond():
    # v_c = 1, v_u = 3 on a constant field: guided v = 3 + g (1 - 3)
    def model(x, t, c):
        return torch.ones_like(x) * c[:, :1, :1].view(-1, 1, 1, 1, 1)

    noise = torch.zeros(1, 1, 1, 2, 2)
    out = EulerSampler(1, 1.0, guidance=4.0).sample(model, noise, torch.ones(1, 1, 1), uncond=3 * torch.ones(1, 2, 1))
    assert torch.allclose(out, torch.full_like(noise, -(3 + 4 * (1 - 3))))


def test_low_noise_steps_use_their_own_guidance():
    # v_c = 1, v_u = 3: a step at scale g moves x by (s_next - s) (3 + g (1 - 3)); 4 steps over
    # sigmas 1, .75, .5, .25 -> 0 with boundary 0.5: the last two steps (0.5, 0.25) are low-noise
    def model(x, t, c):
        return torch.ones_like(x) * c[:, :1, :1].view(-1, 1, 1, 1, 1)

    noise, cond, uncond = torch.zeros(1, 1, 1, 2, 2), torch.ones(1, 1, 1), 3 * torch.ones(1, 1, 1)
    out = EulerSampler(4, 1.0, guidance=4.0, low_noise_guidance=1.0, boundary=0.5).sample(model, noise, cond, uncond)
    expected = -0.5 * (3 + 4 * (1 - 3)) - 0.5 * (3 + 1 * (1 - 3))
    assert torch.allclose(out, torch.full_like(noise, expected))
    same = EulerSampler(4, 1.0, guidance=4.0, low_noise_guidance=1.0).sample(model, noise, cond, uncond)  # no boundary
    assert torch.allclose(same, EulerSampler(4, 1.0, guidance=4.0).sample(model, noise, cond, uncond))


def test_fewstep_with_perfect_x0_predictor_returns_x0():
    x0 = torch.randn(2, 3, 1, 4, 4)

    def oracle(x, t, c):  # v such that x - sigma v = x0 exactly
        s = (t / 1000).view(-1, 1, 1, 1, 1)
        return (x - x0) / s

    sampler = FewStepSampler([1.0, 0.94, 0.83, 0.63])
    gen = torch.Generator().manual_seed(0)
    out = sampler.sample(oracle, torch.randn(2, 3, 1, 4, 4), torch.zeros(2, 1, 1), generator=gen)
    assert torch.allclose(out, x0, atol=1e-5)


def test_fewstep_is_deterministic_under_a_seed_and_renoises():
    calls = []

    def model(x, t, c):
        calls.append(x.clone())
        return 0.5 * x

    def run(seed):
        calls.clear()
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(1, 2, 1, 3, 3, generator=gen)
        return FewStepSampler([1.0, 0.8, 0.5]).sample(model, noise, torch.zeros(1, 1, 1), generator=gen), list(calls)

    a, ca = run(7)
    b, cb = run(7)
    c, _ = run(8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # step 2 input is (1 - 0.8) x0 + 0.8 eps with fresh eps: not a deterministic function of step 1's input
    x0_1 = ca[0] - 1.0 * 0.5 * ca[0]
    assert not torch.allclose(ca[1], (1 - 0.8) * x0_1 + 0.8 * ca[0])
    assert len(ca) == 3
