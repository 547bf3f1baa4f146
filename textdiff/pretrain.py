"""Training the in-domain teacher: a DDPM on unlabeled images, the way Baranchuk et al. did.

OpenAI's ImageNet checkpoint cannot be fetched everywhere, and a DDPM of the user's own stain and
scanner needs no labels. This trains any ADM config with the DDPM objective (epsilon MSE, plus the
variational term when the model learns its variance), AdamW, gradient clipping and an EMA of the
weights; the EMA is what gets exported, in guided-diffusion's key layout, so the result loads
through `teacher.checkpoint` like any guided-diffusion file.

Only images of the train and val splits are seen, as random crops with flips and quarter turns.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from textdiff.errors import TextDiffError
from textdiff.teacher import Diffusion, build_adm
from textdiff.views import NUM_VIEWS, apply_view


class CropSampler:
    """Random model-size crops of uint8 [N, H, W, 3] images, flipped/rotated, scaled to [-1, 1]."""

    def __init__(self, images: np.ndarray, crop: int, seed: int):
        if images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
            raise TextDiffError(f"pretrain needs a non-empty [N, H, W, 3] image stack, got {images.shape}")
        h, w = images.shape[1:3]
        if crop > min(h, w):
            raise TextDiffError(f"pretrain.config image_size {crop} is larger than the images ({h}x{w})")
        self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        self.crop = crop
        self.gen = torch.Generator().manual_seed(seed)

    def sample(self, batch: int) -> torch.Tensor:
        n, _, h, w = self.images.shape
        out = []
        for _ in range(batch):
            i = int(torch.randint(n, (1,), generator=self.gen))
            y = int(torch.randint(h - self.crop + 1, (1,), generator=self.gen))
            x = int(torch.randint(w - self.crop + 1, (1,), generator=self.gen))
            view = int(torch.randint(NUM_VIEWS, (1,), generator=self.gen))
            out.append(apply_view(self.images[i, :, y : y + self.crop, x : x + self.crop], view))
        return torch.stack(out).float() / 127.5 - 1.0


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


@dataclass
class PretrainState:
    model: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: int = 0
    losses: list | None = None
    # What the last `pretrain` call did, for the steps/s figure (not saved: a resume starts a new run).
    trained_steps: int = 0
    seconds: float = 0.0

    def state_dict(self, sampler: CropSampler, identity: str) -> dict:
        """Everything a resumed run needs to continue exactly where this one stopped.

        `identity` (a JSON string of what was trained: config, hyper-parameters, schedule, data)
        lives inside the same file, so a checkpoint can never be resumed under other settings.
        """
        return {
            "identity": identity,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "losses": list(self.losses or []),
            "sampler_rng": sampler.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
        }


def new_state(config: dict, lr: float, weight_decay: float, seed: int, device: torch.device) -> PretrainState:
    torch.manual_seed(seed)
    model = build_adm(config).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    return PretrainState(model, ema, optimizer, 0, [])


def resume_state(state: PretrainState, path: Path, sampler: CropSampler, max_step: int, identity: str) -> str:
    """Continue from the checkpoint at `path` if it was made with the same `identity`.

    Returns "resumed", or why not: "different" (other config, hyper-parameters, schedule or
    images) or "past" (a checkpoint beyond `max_step` is not used: training cannot be undone, and a
    budget of 0 steps must give the randomly initialised control, not yesterday's teacher).
    """
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("identity") != identity:
            return "different"
        if int(blob["step"]) > max_step:
            return "past"
        state.model.load_state_dict(blob["model"])
        state.ema.load_state_dict(blob["ema"])
        state.optimizer.load_state_dict(blob["optimizer"])
        sampler.gen.set_state(blob["sampler_rng"])
        torch.set_rng_state(blob["torch_rng"])
        state.step = int(blob["step"])
        state.losses = [float(v) for v in blob.get("losses", [])]
    except Exception as err:  # noqa: BLE001 - a torn or foreign file: say which
        raise TextDiffError(f"{path}: cannot resume pretraining from this checkpoint ({type(err).__name__}); delete it to start over") from None
    return "resumed"


def lr_at(step: int, base: float, warmup: int) -> float:
    return base * min(1.0, (step + 1) / warmup) if warmup > 0 else base


def pretrain(
    state: PretrainState,
    diffusion: Diffusion,
    sampler: CropSampler,
    total_steps: int,
    batch_size: int,
    lr: float,
    warmup: int,
    ema_decay: float,
    grad_clip: float,
    device: torch.device,
    checkpoint: Callable[[PretrainState], None] | None = None,
    checkpoint_every: int = 500,
    on_step: Callable[[int, float], None] | None = None,
    progress: bool = True,
) -> PretrainState:
    """Run the DDPM objective from `state.step` up to `total_steps`."""
    model = state.model.train()
    use_bf16 = device.type == "cuda"
    remaining = max(0, total_steps - state.step)
    bar = tqdm(total=total_steps, initial=state.step, unit="step", desc="pretrain", disable=not progress,
               dynamic_ncols=True)
    started, window = time.perf_counter(), []
    while state.step < total_steps:
        # Timesteps and noise come from the CPU generator, whose state the checkpoint saves: a run
        # resumed on a GPU then continues the same random stream as one that was never stopped.
        x0 = sampler.sample(batch_size)
        t = torch.randint(diffusion.num_timesteps, (batch_size,))
        noise = torch.randn(x0.shape)
        x0, t, noise = x0.to(device), t.to(device), noise.to(device)
        for group in state.optimizer.param_groups:
            group["lr"] = lr_at(state.step, lr, warmup)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            losses = diffusion.training_losses(model, x0, t, noise)
        loss = losses["loss"].mean()
        if not torch.isfinite(loss):
            raise TextDiffError(f"pretraining diverged at step {state.step} (loss {loss.item()}); lower pretrain.lr")
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        state.optimizer.step()
        ema_update(state.ema, model, ema_decay)
        state.step += 1
        value = float(loss.detach())
        state.losses.append(value)
        window.append(value)
        if on_step is not None:
            on_step(state.step, value)
        elapsed = time.perf_counter() - started
        bar.set_postfix(loss=f"{np.mean(window[-50:]):.4f}", steps_s=f"{len(window) / max(elapsed, 1e-9):.2f}")
        bar.update(1)
        if checkpoint is not None and (state.step % checkpoint_every == 0 or state.step == total_steps):
            checkpoint(state)
    bar.close()
    state.seconds = time.perf_counter() - started
    state.trained_steps = remaining
    return state


@torch.no_grad()
def sample_grid(model: torch.nn.Module, diffusion: Diffusion, n: int, size: int, steps: int,
                device: torch.device, seed: int = 0) -> np.ndarray:
    """A row of DDIM samples as one uint8 RGB image, so a person can see what the teacher learned."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = diffusion.ddim_sample_loop(model.eval(), (n, 3, size, size), steps=steps, generator=gen, device=device)
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    grid = torch.full((3, rows * size, cols * size), 255, dtype=torch.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        grid[:, r * size : (r + 1) * size, c * size : (c + 1) * size] = x[k]
    return grid.permute(1, 2, 0).numpy()
