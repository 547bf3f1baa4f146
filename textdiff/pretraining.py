"""Training the in-domain teacher: a DDPM on unlabeled images, the way Baranchuk et al. did.

OpenAI's ImageNet checkpoint cannot be fetched everywhere, and a DDPM of the user's own stain and
scanner needs no labels. This trains any ADM config with the DDPM objective (epsilon MSE, plus the
variational term when the model learns its variance), AdamW, gradient clipping and an EMA of the
weights; the EMA is what gets exported, in guided-diffusion's key layout, so the result loads
through `teacher.checkpoint` like any guided-diffusion file.

Only images of the train and val splits are seen, as random crops with flips and quarter turns.
Resumable: a `state.pt` is written every `pretrain.checkpoint_every` steps, and a re-run continues
its step count (the DVC out is `persist: true` so DVC does not delete it first).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from textdiff.atomic import atomic_file, remove_stale_temporaries, write_json
from textdiff.data import load_prepared
from textdiff.errors import TextDiffError
from textdiff.hashing import sha256_images
from textdiff.panels import save_png
from textdiff.params import Params, section_dict
from textdiff.paths import PREPARED_DIR, PRETRAIN_LIVE_DIR, TEACHER_FILE
from textdiff.runtime import provenance, resolve_device
from textdiff.teacher import normalize_config, save_checkpoint
from textdiff.teacher.checkpoint import sidecar_path
from textdiff.teacher import Diffusion, build_adm
from textdiff.teacher.diffusion import from_model_range, to_model_range
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
        return to_model_range(torch.stack(out))


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
    x = from_model_range(x).cpu()
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    grid = torch.full((3, rows * size, cols * size), 255, dtype=torch.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        grid[:, r * size : (r + 1) * size, c * size : (c + 1) * size] = x[k]
    return grid.permute(1, 2, 0).numpy()


# ----------------------------------------------------------------------------------------------
# the pretrain stage's work

PRETRAIN_SPLITS = ("train", "val")
STALE_EXPORTS = (TEACHER_FILE, "teacher.json", "samples.png")


def unlabeled_images(prepared_dir: Path = PREPARED_DIR) -> np.ndarray:
    """Train + val images only. The masks are not used: pretraining needs no labels."""
    return np.concatenate([load_prepared(prepared_dir, split).images for split in PRETRAIN_SPLITS])


def trim_dvclive(folder: Path, max_step: int) -> None:
    """Drop logged rows past `max_step`: after a kill, the steps since the last checkpoint are
    trained again and would otherwise appear twice in the loss curve."""
    for tsv in (folder / "plots" / "metrics").rglob("*.tsv"):
        lines = tsv.read_text().splitlines()
        if not lines or "step" not in lines[0].split("\t"):
            continue
        col = lines[0].split("\t").index("step")
        kept = [lines[0]] + [ln for ln in lines[1:] if ln.strip() and int(ln.split("\t")[col]) <= max_step]
        with atomic_file(tsv) as tmp:
            tmp.write_text("\n".join(kept) + "\n")


def training_identity(params: Params, images_sha: str) -> dict:
    """What makes two runs the same training run: a checkpoint resumes only under all of it.

    The budget and the bookkeeping (steps, checkpoint interval, samples, device, export type)
    are left out: a longer budget continues the same run.
    """
    not_training = ("steps", "checkpoint_every", "samples", "sample_steps", "device", "export_dtype", "out")
    return {
        "config": normalize_config(params.pretrain.config),
        "pretrain": {k: v for k, v in section_dict(params.pretrain).items() if k not in not_training},
        "schedule": params.teacher.schedule,
        "diffusion_steps": params.teacher.diffusion_steps,
        "images_sha256": images_sha,
        "splits": list(PRETRAIN_SPLITS),
    }


def skip_reason(params: Params) -> str | None:
    """Why no teacher needs training (the user brought one, or the RGB control needs none)."""
    if params.teacher.checkpoint:
        return f"teacher.checkpoint is set ({params.teacher.checkpoint})"
    if params.teacher.kind == "rgb":
        return "teacher.kind is rgb (the raw-pixel control needs no teacher)"
    return None


def skip(params: Params, out: Path, reason: str) -> None:
    """Remove the exported teacher (extract must not pick it up by accident) but keep the
    resumable state, so switching back to the in-domain teacher costs nothing. A
    teacher.checkpoint that names the export itself is the user's choice and is kept."""
    brought = Path(params.teacher.checkpoint).resolve() if params.teacher.checkpoint else None
    for name in STALE_EXPORTS:
        stale = out / name
        if brought is not None and stale.resolve() in (brought, sidecar_path(brought)):
            continue
        stale.unlink(missing_ok=True)
    write_json(out / "summary.json", {"skipped": True, "reason": reason})


def _resume(state: PretrainState, state_path: Path, sampler: CropSampler, steps: int, identity: str) -> None:
    if not state_path.is_file():
        return
    outcome = resume_state(state, state_path, sampler, steps, identity)
    if outcome == "resumed":
        print(f"pretrain: resuming at step {state.step} from {state_path}")
    elif outcome == "past":
        print(f"pretrain: {state_path} is past pretrain.steps={steps}; starting over (it is overwritten at the first checkpoint)")
    else:
        print(f"pretrain: {state_path} was made with another config, hyper-parameters, schedule or images; starting over")


def _summary(state: PretrainState, device: torch.device, previous: Path) -> dict:
    """summary.json; a run with nothing left to train keeps the rate measured before."""
    trained, seconds = state.trained_steps, state.seconds
    losses = state.losses or [float("nan")]
    summary = {
        "skipped": False,
        "steps": state.step,
        "steps_this_run": trained,
        "seconds_this_run": round(seconds, 1),
        "steps_per_second": round(trained / seconds, 3) if trained and seconds > 0 else None,
        "device": str(device),
        "final_loss_mean_last_100": float(np.mean(losses[-100:])),
        "parameters": sum(t.numel() for t in state.ema.parameters()),
    }
    if not trained and previous.is_file():
        try:
            old = json.loads(previous.read_text())
        except (OSError, ValueError):
            old = {}
        if isinstance(old, dict) and not old.get("skipped"):
            for key in ("steps_per_second", "device", "seconds_this_run", "steps_this_run"):
                summary[key] = old.get(key, summary[key])
    return summary


def export_teacher(state: PretrainState, params: Params, diffusion: Diffusion, data_sha: str,
                   device: torch.device) -> dict:
    """The EMA teacher (+ sidecar), a sample grid, the loss curve and summary.json, into `pretrain.out`."""
    p, out = params.pretrain, Path(params.pretrain.out)
    summary = _summary(state, device, out / "summary.json")
    try:
        save_checkpoint(state.ema, out / TEACHER_FILE, dtype=p.export_dtype, extra_metadata={
            "steps": state.step, "ema_decay": p.ema_decay, "trained_on": list(PRETRAIN_SPLITS),
            "images_sha256": data_sha, "schedule": params.teacher.schedule,
            "diffusion_steps": params.teacher.diffusion_steps, "provenance": provenance()})
        if p.samples:
            size = normalize_config(p.config)["image_size"]
            grid = sample_grid(state.ema, diffusion, p.samples, size, p.sample_steps, device, seed=p.seed)
            with atomic_file(out / "samples.png") as tmp:
                save_png(tmp, grid, format="PNG")
        with atomic_file(out / "loss.tsv") as tmp:
            np.savetxt(tmp, np.asarray(state.losses), header="loss", comments="", fmt="%.6f")
        write_json(out / "summary.json", summary)
    except OSError as err:
        raise TextDiffError(f"{out}: cannot write the exported teacher ({err.strerror or err})") from None
    return summary


def run_pretraining(params: Params, params_path: Path, prepared_dir: Path = PREPARED_DIR) -> str:
    """The pretrain stage: skip, or resume/start, train to `pretrain.steps`, export. Returns a
    one-line account of what happened."""
    p = params.pretrain
    out = Path(p.out)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    reason = skip_reason(params)
    if reason is not None:
        skip(params, out, reason)
        return f"pretrain: skipped, {reason}"
    if not p.config:
        raise TextDiffError(f"{params_path}: pretrain.config is empty (the ADM to train); see README")
    config = normalize_config(p.config)
    device = resolve_device(p.device)
    diffusion = Diffusion(params.teacher.schedule, params.teacher.diffusion_steps)
    images = unlabeled_images(prepared_dir)
    data_sha = sha256_images(images)
    sampler = CropSampler(images, config["image_size"], p.seed)
    state = new_state(config, p.lr, p.weight_decay, p.seed, device)
    identity_dict = training_identity(params, data_sha)
    identity = json.dumps(identity_dict, sort_keys=True)
    state_path = out / "state.pt"
    _resume(state, state_path, sampler, p.steps, identity)
    write_json(out / "state.json", identity_dict)  # for people; the copy inside state.pt is what counts

    def checkpoint(s: PretrainState) -> None:
        try:
            with atomic_file(state_path) as tmp:
                torch.save(s.state_dict(sampler, identity), tmp)
        except OSError as err:
            raise TextDiffError(f"{state_path}: cannot write the pretraining checkpoint ({err.strerror or err})") from None

    from dvclive import Live

    if state.step > 0:
        trim_dvclive(PRETRAIN_LIVE_DIR, state.step)
    with Live(str(PRETRAIN_LIVE_DIR), save_dvc_exp=False, dvcyaml=None, report=None, resume=state.step > 0) as live:
        every = max(1, p.steps // 200)

        def log(step: int, loss: float) -> None:
            if step % every == 0:
                live.step = step
                live.log_metric("pretrain/loss", float(np.mean(state.losses[-every:])))

        pretrain(state, diffusion, sampler, p.steps, p.batch_size, p.lr, p.warmup, p.ema_decay, p.grad_clip,
                 device, checkpoint=checkpoint, checkpoint_every=p.checkpoint_every, on_step=log)

    summary = export_teacher(state, params, diffusion, data_sha, device)
    rate = (f", {state.trained_steps} this run at {summary['steps_per_second']} steps/s on {device}"
            if state.trained_steps else ", already trained")
    return f"pretrain: {state.step} steps{rate}; EMA teacher -> {out / TEACHER_FILE}"
