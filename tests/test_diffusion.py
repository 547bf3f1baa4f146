"""Noise schedules, q_sample parity with guided-diffusion, the training loss, the samplers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_adm

from textdiff.errors import TextDiffError
from textdiff.teacher import Diffusion
from textdiff.teacher.diffusion import discretized_gaussian_log_likelihood, normal_kl, space_timesteps

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "adm"
needs_fixtures = pytest.mark.skipif(
    not (FIXTURES / "adm_small_io.pt").is_file(),
    reason=f"guided-diffusion parity fixtures not found in {FIXTURES}",
)

TINY = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8")


def _random_model(**overrides):
    return random_adm({**TINY, **overrides}, 0.02)


# -- schedules --------------------------------------------------------------------------------------


def test_linear_schedule_known_values():
    d = Diffusion("linear", 1000)
    assert d.betas.dtype == np.float64 and d.betas.shape == (1000,)
    assert d.betas[0] == pytest.approx(1e-4, abs=1e-15) and d.betas[-1] == pytest.approx(0.02, abs=1e-15)
    assert np.all(np.diff(d.alphas_cumprod) < 0)
    np.testing.assert_allclose(d.sqrt_alphas_cumprod**2 + d.sqrt_one_minus_alphas_cumprod**2, 1.0, atol=1e-12)
    assert d.alphas_cumprod[-1] == pytest.approx(4.04e-5, rel=1e-2)  # nearly pure noise at T
    short = Diffusion("linear", 250)  # stretched: same noise range with fewer steps
    assert short.betas[0] == pytest.approx(4e-4) and short.betas[-1] == pytest.approx(0.08)


def test_cosine_schedule_known_values():
    d = Diffusion("cosine", 1000)
    abar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert d.betas[0] == pytest.approx(1 - abar(0.001) / abar(0.0), rel=1e-12)
    assert d.betas[0] == pytest.approx(4.128e-5, rel=1e-3)
    assert d.betas[-1] == 0.999  # capped at max_beta
    assert np.all(np.diff(d.alphas_cumprod) < 0) and d.alphas_cumprod.dtype == np.float64
    assert d.alphas_cumprod[499] == pytest.approx(abar(0.5) / abar(0.0), rel=1e-9)


@needs_fixtures
def test_linear_alphas_cumprod_and_q_sample_match_guided_diffusion():
    io = torch.load(FIXTURES / "adm_small_io.pt", weights_only=True)
    d = Diffusion()
    np.testing.assert_allclose(d.alphas_cumprod, io["alphas_cumprod"].numpy(), rtol=1e-12, atol=1e-12)
    x_t = d.q_sample(io["x0"], io["t"], io["noise"])
    assert x_t.dtype == torch.float32
    assert (x_t - io["x_t"]).abs().max().item() <= 1e-6


def test_q_sample_broadcasts_shared_noise_and_scalar_t():
    d = Diffusion()
    x0 = torch.rand(3, 3, 8, 8) * 2 - 1
    noise = torch.randn(3, 8, 8)
    x_t = d.q_sample(x0, 100, noise)
    expected = math.sqrt(d.alphas_cumprod[100]) * x0 + math.sqrt(1 - d.alphas_cumprod[100]) * noise
    torch.testing.assert_close(x_t, expected)


def test_bad_schedule_arguments():
    with pytest.raises(TextDiffError, match="schedule"):
        Diffusion("quadratic")
    with pytest.raises(TextDiffError, match="num_timesteps"):
        Diffusion("linear", 0)
    with pytest.raises(TextDiffError, match="more than 20 steps"):
        Diffusion("linear", 20)  # beta_T would be 1: alphas_cumprod hits 0
    with pytest.raises(TextDiffError, match="steps"):
        space_timesteps(1000, 0)


def test_respacing_keeps_alphas_cumprod():
    d = Diffusion()
    assert space_timesteps(1000, 50) == list(range(0, 1000, 20))
    assert space_timesteps(1000, 3) == [0, 334, 668]
    r = d.respaced(50)
    np.testing.assert_allclose(r.alphas_cumprod, d.alphas_cumprod[::20], rtol=1e-12)
    assert r.timestep_map.tolist() == list(range(0, 1000, 20))
    assert d.respaced(1000) is d


# -- training loss ----------------------------------------------------------------------------------


def test_training_losses_mse_matches_hand_computation_eps_model():
    d = Diffusion()
    model = _random_model()
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([10, 600])
    losses = d.training_losses(model, x0, t, noise)
    abar = torch.tensor(d.alphas_cumprod[[10, 600]], dtype=torch.float32).view(2, 1, 1, 1)
    with torch.no_grad():
        eps = model(abar.sqrt() * x0 + (1 - abar).sqrt() * noise, t)
    hand = ((eps - noise) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(losses["mse"].detach(), hand)
    assert torch.equal(losses["vb"], torch.zeros(2))
    torch.testing.assert_close(losses["loss"], losses["mse"])


def test_training_losses_learned_sigma_adds_vb_with_frozen_mean():
    d = Diffusion()
    model = _random_model(learn_sigma=True).train()
    x0 = torch.rand(3, 3, 16, 16) * 2 - 1
    t = torch.tensor([0, 5, 900])
    losses = d.training_losses(model, x0, t, torch.randn_like(x0))
    assert set(losses) == {"loss", "mse", "vb"} and all(v.shape == (3,) for v in losses.values())
    assert all(torch.isfinite(v).all() for v in losses.values())
    assert (losses["vb"] > 0).all()
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])
    # vb must not push on the mean: its gradient w.r.t. the eps channels' head is zero.
    model.zero_grad()
    losses["vb"].sum().backward()
    head = model.out[2].weight.grad
    assert head[:3].abs().max() == 0 and head[3:].abs().max() > 0


def test_likelihood_helpers():
    zero = torch.zeros(4)
    torch.testing.assert_close(normal_kl(zero, zero, zero, zero), zero)
    x = torch.tensor([-1.0, 0.0, 1.0])
    logp = discretized_gaussian_log_likelihood(x, x.clone(), torch.full((3,), -8.0))
    assert (logp <= 0).all() and (logp > -1e-3).all()  # a very narrow Gaussian on the bin: P ~ 1


# -- samplers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_ddim_sampler_produces_finite_samples(learn_sigma):
    d = Diffusion("linear", 50)
    model = _random_model(learn_sigma=learn_sigma)
    a = d.ddim_sample_loop(model, (2, 3, 16, 16), steps=5, generator=torch.Generator().manual_seed(3))
    b = d.ddim_sample_loop(model, (2, 3, 16, 16), steps=5, generator=torch.Generator().manual_seed(3))
    assert a.shape == (2, 3, 16, 16) and torch.isfinite(a).all()
    assert torch.equal(a, b)  # eta=0 with a seeded generator is deterministic
    c = d.ddim_sample_loop(model, (2, 3, 16, 16), steps=5, eta=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.isfinite(c).all() and not torch.equal(a, c)


def test_ddim_with_a_perfect_denoiser_recovers_the_data():
    """If the model returns the true epsilon for a single data point, DDIM lands on it."""
    d = Diffusion("linear", 1000)
    target = torch.full((1, 3, 4, 4), 0.5)

    class Oracle(torch.nn.Module):
        def forward(self, x, t):
            abar = torch.tensor(d.alphas_cumprod, dtype=torch.float32)[t].view(-1, 1, 1, 1)
            return (x - abar.sqrt() * target) / (1 - abar).sqrt()

    out = d.ddim_sample_loop(Oracle(), (1, 3, 4, 4), steps=20, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, target, atol=1e-3, rtol=0)
