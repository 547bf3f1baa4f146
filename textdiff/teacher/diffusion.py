"""Gaussian diffusion: noise schedules, q_sample, the training loss and the DDIM sampler.

Follows guided-diffusion's conventions so its checkpoints behave as they were trained:

* tables are float64 numpy arrays, looked up at t and only then cast to float32;
* the model predicts epsilon; when its output has twice the input channels (learn_sigma) the
  extra channels v in [-1, 1] pick a log-variance between the clipped posterior variance and
  beta_t ("learned range", improved DDPM), otherwise the variance is "fixed large" (beta_t);
* the training loss is eps-MSE, plus, with learned variance, the variational-bound term in
  bits computed with the predicted mean stop-gradded (improved DDPM's hybrid loss,
  ``LossType.MSE``). guided-diffusion's RESCALED_MSE would multiply vb by T/1000, which is 1
  for the default T = 1000.

Sampling with fewer steps than T uses the respacing of improved DDPM: keep a subset of
timesteps, derive the betas that reproduce their alphas_cumprod exactly, and call the model
with the original timestep indices.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from textdiff.errors import TextDiffError

SCHEDULES = ("linear", "cosine")


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [..., 3, H, W] -> float32 in [-1, 1], the range a DDPM is trained and run on."""
    return images.float() / 127.5 - 1.0


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """The inverse of `to_model_range`, clamped and rounded to uint8 (for sample grids)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def linear_betas(num_timesteps: int) -> np.ndarray:
    """Ho et al.'s 1e-4 -> 0.02 ramp, stretched so T != 1000 covers the same noise range."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def betas_for_alpha_bar(num_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999) -> np.ndarray:
    """Discretize a continuous alpha_bar(t), t in [0, 1], into T betas (capped at max_beta)."""
    betas = [
        min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return np.array(betas, dtype=np.float64)


def cosine_betas(num_timesteps: int) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule: alpha_bar(t) = cos((t + s) / (1 + s) * pi/2)^2, s=0.008."""
    return betas_for_alpha_bar(num_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)


def space_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """Which of the T timesteps a `steps`-step sampler visits (ascending).

    Like guided-diffusion's "ddimN": the first integer stride giving exactly `steps` timesteps
    starting at 0; when no stride fits, evenly spaced rounded positions over [0, T-1].
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= num_timesteps:
        raise TextDiffError(f"steps: expected an integer in [1, {num_timesteps}], got {steps!r}")
    if steps == num_timesteps:
        return list(range(num_timesteps))
    for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == steps:
            return list(range(0, num_timesteps, stride))
    return sorted({round(x) for x in np.linspace(0, num_timesteps - 1, steps)})


def _extract(table: np.ndarray, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """table[t] as float32 [N, 1, 1, ...] on t's device (index in float64, then cast)."""
    values = torch.from_numpy(table)[t.detach().cpu().long()].float().to(t.device)
    return values.reshape(-1, *([1] * (ndim - 1)))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log P(x) for x in [-1, 1] quantized to 256 bins of width 2/255 (the decoder NLL at t = 0).

    Edge bins absorb the tails; probabilities are floored at 1e-12 before the log.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _randn(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    if generator is None:
        return torch.randn(*shape, device=device)
    return torch.randn(*shape, generator=generator, device=generator.device).to(device)


class Diffusion:
    """The forward process q(x_t | x_0) and what training and sampling need from it.

    ``Diffusion("linear", 1000)`` is guided-diffusion's default; ``Diffusion(betas=...)``
    builds a process from explicit betas (used for respaced sampling). All tables are float64
    numpy arrays of length ``num_timesteps``. ``timestep_map[i]`` is the timestep index the
    model is called with for this process's step i (the identity unless respaced).
    """

    def __init__(self, schedule: str = "linear", num_timesteps: int = 1000, *, betas: np.ndarray | None = None,
                 timestep_map: Sequence[int] | None = None):
        if betas is None:
            if schedule not in SCHEDULES:
                raise TextDiffError(f"schedule: expected one of {', '.join(SCHEDULES)}, got {schedule!r}")
            if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
                raise TextDiffError(f"num_timesteps: expected a positive integer, got {num_timesteps!r}")
            betas = linear_betas(num_timesteps) if schedule == "linear" else cosine_betas(num_timesteps)
        else:
            schedule = "custom"
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) == 0 or not ((betas > 0) & (betas < 1)).all():
            if schedule == "linear":  # beta_T = 20 / T: T <= 20 destroys the signal completely
                raise TextDiffError(f"num_timesteps: the linear schedule needs more than 20 steps, got {num_timesteps}")
            raise TextDiffError("betas: expected a non-empty 1-D array with values in (0, 1)")
        self.schedule = schedule
        self.num_timesteps = int(len(betas))
        steps = range(self.num_timesteps) if timestep_map is None else timestep_map
        self.timestep_map = np.asarray(steps, dtype=np.int64)

        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        # Posterior q(x_{t-1} | x_t, x_0). Its variance is 0 at t = 0, so the log is clipped by
        # repeating the t = 1 value there.
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        if self.num_timesteps > 1:
            clipped = np.append(self.posterior_variance[1], self.posterior_variance[1:])
        else:
            clipped = betas.copy()
        self.posterior_log_variance_clipped = np.log(clipped)
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        # "Fixed large" variance: beta_t, except posterior variance at t = 0 for a better decoder.
        self.fixed_large_variance = np.append(clipped[0] if self.num_timesteps > 1 else betas[0], betas[1:])

    def __repr__(self) -> str:
        return f"Diffusion(schedule={self.schedule!r}, num_timesteps={self.num_timesteps})"

    # -- forward process ------------------------------------------------------------------------

    def _t(self, t: torch.Tensor | int, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(t):
            t = torch.tensor(t)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        return t.to(x.device)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (noise may broadcast, e.g. [C, H, W])."""
        t = self._t(t, x0)
        if noise is None:
            noise = torch.randn_like(x0)
        return _extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0 + _extract(
            self.sqrt_one_minus_alphas_cumprod, t, x0.ndim
        ) * noise

    def q_posterior_mean_variance(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        n = x_t.ndim
        mean = _extract(self.posterior_mean_coef1, t, n) * x0 + _extract(self.posterior_mean_coef2, t, n) * x_t
        return mean, _extract(self.posterior_log_variance_clipped, t, x_t.ndim)

    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        n = x_t.ndim
        return (_extract(self.sqrt_recip_alphas_cumprod, t, n) * x_t
                - _extract(self.sqrt_recipm1_alphas_cumprod, t, n) * eps)

    def predict_eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        n = x_t.ndim
        return ((_extract(self.sqrt_recip_alphas_cumprod, t, n) * x_t - x0)
                / _extract(self.sqrt_recipm1_alphas_cumprod, t, n))

    # -- reverse process ------------------------------------------------------------------------

    def _split_output(
        self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, log_variance) from a model output of C (fixed large) or 2C (learned range) channels."""
        c = x_t.shape[1]
        if output.shape[1] == 2 * c:
            eps, v = output.split(c, dim=1)
            min_log = _extract(self.posterior_log_variance_clipped, t, x_t.ndim)
            max_log = _extract(np.log(self.betas), t, x_t.ndim)
            frac = (v + 1) / 2
            return eps, frac * max_log + (1 - frac) * min_log
        if output.shape[1] != c:
            raise TextDiffError(f"model output has {output.shape[1]} channels; expected {c} or {2 * c}")
        return output, _extract(np.log(self.fixed_large_variance), t, x_t.ndim).expand_as(x_t)

    def p_mean_variance(
        self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True
    ) -> dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t) from a model output: mean, log_variance, pred_x0, eps."""
        eps, log_variance = self._split_output(output, x_t, t)
        pred_x0 = self.predict_x0_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        return {"mean": mean, "log_variance": log_variance, "pred_x0": pred_x0, "eps": eps}

    def _model_t(self, t: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.timestep_map)[t.cpu()].to(t.device)

    # -- training -------------------------------------------------------------------------------

    def training_losses(self, model: torch.nn.Module, x0: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-sample losses, each of shape [N]: ``loss = mse + vb``.

        mse: mean squared error of the predicted epsilon. vb: with a learned variance, the
        variational-bound term in bits (decoder NLL at t = 0, posterior KL otherwise) evaluated
        with the predicted mean detached, so only the variance channels learn from it; zeros
        when the model predicts epsilon only.
        """
        t = self._t(t, x0)
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        output = model(x_t, self._model_t(t))
        c = x0.shape[1]
        eps = output[:, :c]
        mse = _mean_flat((noise - eps) ** 2)
        if output.shape[1] == 2 * c:
            frozen = torch.cat([eps.detach(), output[:, c:]], dim=1)
            vb = self._vb_bits(frozen, x0, x_t, t)
        else:
            vb = torch.zeros_like(mse)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def _vb_bits(self, output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        true_mean, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
        p = self.p_mean_variance(output, x_t, t, clip_denoised=False)
        kl = _mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    # -- sampling -------------------------------------------------------------------------------

    def respaced(self, steps: int) -> Diffusion:
        """A `steps`-step process on a subset of timesteps with the same alphas_cumprod there."""
        keep = space_timesteps(self.num_timesteps, steps)
        if len(keep) == self.num_timesteps:
            return self
        abar = self.alphas_cumprod[keep]
        betas = 1.0 - abar / np.append(1.0, abar[:-1])
        return Diffusion(betas=betas, timestep_map=self.timestep_map[keep])

    @staticmethod
    def _device(model: torch.nn.Module, device: torch.device | str | None) -> torch.device:
        if device is not None:
            return torch.device(device)
        param = next(model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    @staticmethod
    def _indices(n: int, progress: bool):
        indices = list(range(n))[::-1]
        if progress:
            from tqdm.auto import tqdm

            return tqdm(indices)
        return indices

    @torch.no_grad()
    def ddim_sample_loop(self, model: torch.nn.Module, shape: Sequence[int], steps: int = 50, eta: float = 0.0,
                         generator: torch.Generator | None = None, progress: bool = False,
                         noise: torch.Tensor | None = None, clip_denoised: bool = True,
                         device: torch.device | str | None = None) -> torch.Tensor:
        """DDIM sampling in `steps` steps (eta = 0: deterministic given the starting noise)."""
        proc = self.respaced(steps)
        device = self._device(model, device)
        x = noise.to(device) if noise is not None else _randn(shape, generator, device)
        for i in self._indices(proc.num_timesteps, progress):
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=device)
            out = proc.p_mean_variance(model(x, proc._model_t(t)), x, t, clip_denoised)
            eps = proc.predict_eps_from_x0(x, t, out["pred_x0"])
            abar = _extract(proc.alphas_cumprod, t, x.ndim)
            abar_prev = _extract(proc.alphas_cumprod_prev, t, x.ndim)
            sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
            x = out["pred_x0"] * torch.sqrt(abar_prev) + torch.sqrt((1 - abar_prev - sigma**2).clamp(min=0)) * eps
            if i > 0 and eta > 0:
                x = x + sigma * _randn(x.shape, generator, device)
        return x
