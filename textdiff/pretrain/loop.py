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

import contextlib
import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from textdiff.atomic import atomic_file, remove_stale_temporaries, write_json
from textdiff.data.dataset import list_images
from textdiff.data.images import IMAGE_SUFFIXES, image_files, read_image
from textdiff.data.prepared import load_prepared, read_manifest
from textdiff.data.resize import to_working_size
from textdiff.data.stain import normalize
from textdiff.errors import TextDiffError
from textdiff.evaluation.panels import save_png
from textdiff.hashing import sha256_images
from textdiff.params import Params, section_dict
from textdiff.paths import PREPARED_DIR, PRETRAIN_LIVE_DIR, TEACHER_FILE, resolve_data_root
from textdiff.pretrain.crops import CropSampler
from textdiff.runtime.device import device_name, provenance, resolve_device
from textdiff.teacher import Diffusion, build_adm, normalize_config, save_checkpoint
from textdiff.teacher.checkpoint import checkpoint_stem, is_index, layout_files, shard_paths, sidecar_path
from textdiff.teacher.diffusion import from_model_range

if TYPE_CHECKING:
    from textdiff.params import DataParams


def ema_decay_at(updates: int, decay: float) -> float:
    """The EMA decay for update number `updates` (0-based): ``min(decay, (1 + n) / (10 + n))``.

    A constant decay keeps ``decay**n`` of the random initialisation in the average: 16.5 % after
    1,800 steps at 0.999, and such a teacher samples pure noise. The warm-up (the schedule of
    TensorFlow's ExponentialMovingAverage with num_updates, also used by diffusers) makes the
    average follow the weights closely at first; the share of the initialisation left after n
    updates is ``prod (1+k)/(10+k)`` = 9! n! / (n+9)!, about 3.6e5 / n**9 (1e-24 at n = 1,800).
    """
    return min(decay, (1.0 + updates) / (10.0 + updates))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """One fused pass over all parameters (a Python loop over 300 tensors costs 6 ms a step on a GPU)."""
    ema_params = list(ema.parameters())
    torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


@dataclass
class PretrainState:
    model: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: int = 0
    losses: list | None = None
    # What the last `pretrain` call did, for the samples/s figure (not saved: a resume starts a new run).
    trained_steps: int = 0
    seconds: float = 0.0
    stopped_by: str = "steps"  # or "max_minutes": the time box ended the run before pretrain.steps

    def state_dict(self, sampler: CropSampler, identity: str) -> dict:
        """Everything a resumed run needs to continue exactly where this one stopped.

        `identity` (a JSON string of what was trained: config, hyper-parameters, schedule, data)
        lives inside the same file, so a checkpoint can never be resumed under other settings.
        The sampler's generator also drew every timestep and noise tensor, so its state is the
        whole random stream.
        """
        return {
            "identity": identity,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "losses": list(self.losses or []),
            "sampler_rng": sampler.get_state(),
            "sampler_device": sampler.device.type,
        }


def new_state(config: dict, lr: float, weight_decay: float, seed: int, device: torch.device) -> PretrainState:
    torch.manual_seed(seed)
    model = build_adm(config).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    # fused AdamW: one kernel for all parameters on a GPU; the CPU keeps the default (foreach).
    fused = True if device.type == "cuda" else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=fused)
    return PretrainState(model, ema, optimizer, 0, [])


def resume_state(state: PretrainState, path: Path, sampler: CropSampler, max_step: int, identity: str) -> str:
    """Continue from the checkpoint at `path` if it was made with the same `identity`.

    Returns "resumed", or why not: "different" (other config, hyper-parameters, schedule or
    images), "past" (a checkpoint beyond `max_step` is not used: training cannot be undone, and a
    budget of 0 steps must give the randomly initialised control, not yesterday's teacher), or
    "device" (made on another kind of device, whose random stream cannot be continued here).
    """
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("identity") != identity:
            return "different"
        if int(blob["step"]) > max_step:
            return "past"
        if blob.get("sampler_device", "cpu") != sampler.device.type:
            return "device"
        state.model.load_state_dict(blob["model"])
        state.ema.load_state_dict(blob["ema"])
        state.optimizer.load_state_dict(blob["optimizer"])
        sampler.set_state(blob["sampler_rng"])
        state.step = int(blob["step"])
        state.losses = [float(v) for v in blob.get("losses", [])]
    except Exception as err:  # noqa: BLE001 - a torn or foreign file: say which
        raise TextDiffError(f"{path}: cannot resume pretraining from this checkpoint ({type(err).__name__}); delete "
                            "it to start over") from None
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
    on_log: Callable[[int, list[float]], None] | None = None,
    log_every: int = 50,
    max_seconds: float | None = None,
    compile: bool = False,
    progress: bool = True,
) -> PretrainState:
    """Run the DDPM objective from `state.step` up to `total_steps` (or until `max_seconds`).

    Nothing in a step waits for the device: crops, timesteps and noise are drawn there, the
    losses stay there and are read back every `log_every` steps (where a diverged loss is caught),
    at checkpoints and at the end. `on_log(step, losses)` receives the per-step losses since the
    previous call.
    """
    model = state.model.train()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest convolutions
    forward = torch.compile(model) if compile else model
    use_bf16 = device.type == "cuda"
    first = state.step
    bar = tqdm(total=total_steps, initial=state.step, unit="step", desc="pretrain", disable=not progress,
               dynamic_ncols=True)
    started = time.perf_counter()
    pending: list[torch.Tensor] = []
    params = list(model.parameters())

    def flush() -> None:
        if not pending:
            return
        values = torch.stack(pending).float().tolist()
        pending.clear()
        step0 = state.step - len(values)
        for k, value in enumerate(values):
            if not math.isfinite(value):
                raise TextDiffError(f"pretraining diverged at step {step0 + k} (loss {value}); lower pretrain.lr")
        state.losses.extend(values)
        if on_log is not None:
            on_log(state.step, values)
        elapsed = time.perf_counter() - started
        done = state.step - first
        bar.set_postfix(loss=f"{np.mean(state.losses[-50:]):.4f}",
                        samples_s=f"{done * batch_size / max(elapsed, 1e-9):.1f}", refresh=False)

    while state.step < total_steps:
        if max_seconds is not None and time.perf_counter() - started >= max_seconds:
            state.stopped_by = "max_minutes"
            break
        x0 = sampler.sample(batch_size)
        t = torch.randint(diffusion.num_timesteps, (batch_size,), generator=sampler.gen, device=sampler.device)
        noise = torch.randn(x0.shape, generator=sampler.gen, device=sampler.device)
        x0, t, noise = x0.to(device), t.to(device), noise.to(device)
        for group in state.optimizer.param_groups:
            group["lr"] = lr_at(state.step, lr, warmup)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = diffusion.training_losses(forward, x0, t, noise)["loss"].mean()
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
        state.optimizer.step()
        ema_update(state.ema, model, ema_decay_at(state.step, ema_decay))
        state.step += 1
        pending.append(loss.detach())
        bar.update(1)
        at_checkpoint = checkpoint is not None and state.step % checkpoint_every == 0
        if state.step % log_every == 0 or at_checkpoint:
            flush()
        if at_checkpoint:
            checkpoint(state)
    flush()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    state.seconds = time.perf_counter() - started
    state.trained_steps = state.step - first
    if checkpoint is not None and state.trained_steps and state.step % checkpoint_every:
        checkpoint(state)  # the last step (or where the time box stopped) is resumable too
    bar.close()
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
EXPORT_EXTRAS = ("samples.png",)


def unlabeled_images(prepared_dir: Path = PREPARED_DIR) -> np.ndarray:
    """Train + val images only. The masks are not used: pretraining needs no labels."""
    return np.concatenate([load_prepared(prepared_dir, split).images for split in PRETRAIN_SPLITS])


def working_scale(data: DataParams, height: int, width: int) -> float:
    """Working pixels per source pixel: what prepare does to an image of this size (resize
    squeezes it to image_size², tiles keeps it native)."""
    return 1.0 if data.mode == "tiles" else data.image_size / math.sqrt(height * width)


def _read_folder(folder: Path) -> list[np.ndarray]:
    if not folder.is_dir():
        raise TextDiffError(f"{folder}: pretrain.extra_images folder not found")
    paths = image_files(folder)
    if not paths:
        raise TextDiffError(f"{folder}: pretrain.extra_images holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return [read_image(path)[0] for path in tqdm(paths, desc="extra images", unit="image", leave=False)]


@dataclass
class TeacherImages:
    """What the teacher trains on: images, each one's working scale, and one hash of the pixels."""

    images: list[np.ndarray]
    scales: list[float]
    sha256: str
    described: str


def pretraining_images(params: Params, prepared_dir: Path = PREPARED_DIR) -> TeacherImages:
    """Train + val images (never test) and the user's `extra_images`, at the resolution the sampler
    needs: data/prepared as they are, or with `scale_jitter` the source-resolution files of
    data.root, so that zoomed-in crops are sharp. Under the release protocol the teacher sees BGR,
    as prepare writes it."""
    p, data = params.pretrain, params.data
    source_sizes: list[tuple[int, int]] = []
    if p.scale_jitter > 0 or p.extra_images:
        root = resolve_data_root(data.root)
        paths = [path for split in PRETRAIN_SPLITS for path in list_images(root, split)]
    if p.scale_jitter > 0:
        images = [read_image(path)[0] for path in tqdm(paths, desc="source images", unit="image", leave=False)]
        source_sizes = [im.shape[:2] for im in images]
        scales = [working_scale(data, *size) for size in source_sizes]
        described = f"{len(images)} train+val images at source resolution"
    else:
        images = list(unlabeled_images(prepared_dir))
        scales = [1.0] * len(images)
        described = f"{len(images)} train+val images of {prepared_dir}"
        if p.extra_images:
            for path in paths:
                with Image.open(path) as im:
                    source_sizes.append((im.height, im.width))
    reference = read_manifest(prepared_dir).get("stain") or {}
    if reference and p.scale_jitter > 0:  # data/prepared is normalised already; the source files are not
        images = [normalize(im, reference) for im in images]
    if data.protocol == "release" and p.scale_jitter > 0:
        images = [np.ascontiguousarray(im[..., ::-1]) for im in images]
    if p.extra_images:
        extra = _read_folder(Path(p.extra_images))
        if reference:
            extra = [normalize(im, reference) for im in extra]
        if data.protocol == "release":
            extra = [np.ascontiguousarray(im[..., ::-1]) for im in extra]
        scale = float(np.median([working_scale(data, *size) for size in source_sizes]))
        if p.scale_jitter > 0:
            images += extra
            scales += [scale] * len(extra)
        else:  # the exact-crop sampler needs them at the working resolution
            for im in extra:
                size = (max(1, round(im.shape[0] * scale)), max(1, round(im.shape[1] * scale)))
                images.append(to_working_size(im, size, "project"))
            scales += [1.0] * len(extra)
        described += f" + {len(extra)} of {p.extra_images}"
    if len({im.shape for im in images}) == 1:
        sha = sha256_images(np.stack(images))
    else:
        digest = hashlib.sha256()
        for im in images:
            digest.update(sha256_images(im[None]).encode())
        sha = digest.hexdigest()
    return TeacherImages(images, scales, sha, described)


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


def training_identity(params: Params, images_sha: str, scales: list[float] | None = None) -> dict:
    """What makes two runs the same training run: a checkpoint resumes only under all of it.

    The budget and the bookkeeping (steps, checkpoint interval, samples, device, export type)
    are left out: a longer budget continues the same run.
    """
    not_training = ("steps", "checkpoint_every", "samples", "sample_steps", "device", "export_dtype", "out",
                    "shard_mb", "max_minutes", "compile", "log_every")
    identity = {
        "config": normalize_config(params.pretrain.config),
        # (stain_jitter 0 left out, so runs from before the key existed still resume)
        "pretrain": {k: v for k, v in section_dict(params.pretrain).items()
                     if k not in not_training and not (k == "stain_jitter" and not v)},
        "schedule": params.teacher.schedule,
        "diffusion_steps": params.teacher.diffusion_steps,
        "images_sha256": images_sha,
        "splits": list(PRETRAIN_SPLITS),
    }
    if scales is not None and any(s != 1.0 for s in scales):
        identity["working_scales"] = [round(s, 6) for s in scales]
    return identity


def skip_reason(params: Params) -> str | None:
    """Why no teacher needs training (the user brought one, or the RGB control needs none)."""
    if params.teacher.checkpoint:
        return f"teacher.checkpoint is set ({params.teacher.checkpoint})"
    if params.teacher.kind == "rgb":
        return "teacher.kind is rgb (the raw-pixel control needs no teacher)"
    return None


def _exports(out: Path) -> list[Path]:
    """The pretrain stage's exported teacher in either layout, its sidecar and sample grid."""
    return [*layout_files(checkpoint_stem(out / TEACHER_FILE)), sidecar_path(out / TEACHER_FILE),
            *(out / name for name in EXPORT_EXTRAS)]


def skip(params: Params, out: Path, reason: str) -> None:
    """Remove the exported teacher (extract must not pick it up by accident) but keep the
    resumable state, so switching back to the in-domain teacher costs nothing. A
    teacher.checkpoint that names the export itself is the user's choice and is kept (with its
    sidecar and shards)."""
    brought = Path(params.teacher.checkpoint).resolve() if params.teacher.checkpoint else None
    kept: set[Path] = set()
    if brought is not None and brought.parent == out.resolve():
        kept = {brought, sidecar_path(brought)}
        if is_index(brought) and brought.is_file():
            try:
                kept.update(path.resolve() for path in shard_paths(brought))
            except TextDiffError:
                pass
    for stale in _exports(out):
        if stale.resolve() not in kept:
            stale.unlink(missing_ok=True)
    write_json(out / "summary.json", {"skipped": True, "reason": reason})


def _resume(state: PretrainState, state_path: Path, sampler: CropSampler, steps: int, identity: str) -> None:
    if not state_path.is_file():
        return
    outcome = resume_state(state, state_path, sampler, steps, identity)
    if outcome == "resumed":
        print(f"pretrain: resuming at step {state.step} from {state_path}")
    elif outcome == "past":
        print(f"pretrain: {state_path} is past pretrain.steps={steps}; starting over (it is overwritten at the first "
              "checkpoint)")
    elif outcome == "device":
        print(f"pretrain: {state_path} was made on another kind of device (its random stream cannot be continued "
              "here); starting over")
    else:
        print(f"pretrain: {state_path} was made with another config, hyper-parameters, schedule or images; starting "
              "over")


def _summary(state: PretrainState, device: torch.device, previous: Path, batch_size: int) -> dict:
    """summary.json; a run with nothing left to train keeps the rate measured before."""
    trained, seconds = state.trained_steps, state.seconds
    losses = state.losses or [float("nan")]
    summary = {
        "skipped": False,
        "steps": state.step,
        "steps_this_run": trained,
        "seconds_this_run": round(seconds, 1),
        "steps_per_second": round(trained / seconds, 3) if trained and seconds > 0 else None,
        "samples_per_second": round(trained * batch_size / seconds, 1) if trained and seconds > 0 else None,
        "stopped_by": state.stopped_by if trained else None,
        "device": device_name(device),
        "final_loss_mean_last_100": float(np.mean(losses[-100:])),
        "parameters": sum(t.numel() for t in state.ema.parameters()),
    }
    if not trained and previous.is_file():
        try:
            old = json.loads(previous.read_text())
        except (OSError, ValueError):
            old = {}
        if isinstance(old, dict) and not old.get("skipped"):
            for key in ("steps_per_second", "samples_per_second", "stopped_by", "device", "seconds_this_run",
                        "steps_this_run"):
                summary[key] = old.get(key, summary[key])
    return summary


def export_teacher(state: PretrainState, params: Params, diffusion: Diffusion, data_sha: str,
                   device: torch.device) -> dict:
    """The EMA teacher (+ sidecar; sharded past `pretrain.shard_mb`), a sample grid, the loss curve
    and summary.json, into `pretrain.out`."""
    p, out = params.pretrain, Path(params.pretrain.out)
    summary = _summary(state, device, out / "summary.json", p.batch_size)
    try:
        written = save_checkpoint(state.ema, out / TEACHER_FILE, dtype=p.export_dtype,
                                  shard_mb=p.shard_mb, extra_metadata={
            "steps": state.step, "ema_decay": p.ema_decay, "trained_on": list(PRETRAIN_SPLITS),
            "images_sha256": data_sha, "schedule": params.teacher.schedule,
            "diffusion_steps": params.teacher.diffusion_steps, "provenance": provenance()})
        summary["checkpoint"] = written.name
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
        raise TextDiffError(f"{params_path}: pretrain.config is empty (the ADM to train); see docs/parameters.md")
    config = normalize_config(p.config)
    device = resolve_device(p.device)
    diffusion = Diffusion(params.teacher.schedule, params.teacher.diffusion_steps)
    source = pretraining_images(params, prepared_dir)
    print(f"pretrain: {source.described}, {config['image_size']}px crops"
          + (f", zoom x2^+-{p.scale_jitter:g} around the working scale" if p.scale_jitter else ""))
    data_sha = source.sha256
    sampler = CropSampler(source.images, config["image_size"], p.seed, device=device, scales=source.scales,
                          jitter=p.scale_jitter, stain_jitter=p.stain_jitter)
    state = new_state(config, p.lr, p.weight_decay, p.seed, device)
    identity_dict = training_identity(params, data_sha, source.scales)
    identity = json.dumps(identity_dict, sort_keys=True)
    state_path = out / "state.pt"
    _resume(state, state_path, sampler, p.steps, identity)
    write_json(out / "state.json", identity_dict)  # for people; the copy inside state.pt is what counts

    def checkpoint(s: PretrainState) -> None:
        try:
            with atomic_file(state_path) as tmp:
                torch.save(s.state_dict(sampler, identity), tmp)
        except OSError as err:
            raise TextDiffError(f"{state_path}: cannot write the pretraining checkpoint "
                                f"({err.strerror or err})") from None

    with _loss_log(state.step) as log:
        pretrain(state, diffusion, sampler, p.steps, p.batch_size, p.lr, p.warmup, p.ema_decay, p.grad_clip,
                 device, checkpoint=checkpoint, checkpoint_every=p.checkpoint_every, on_log=log,
                 log_every=p.log_every, max_seconds=p.max_minutes * 60 or None, compile=p.compile)

    summary = export_teacher(state, params, diffusion, data_sha, device)
    rate = (f", {state.trained_steps} this run at {summary['samples_per_second']} samples/s on {summary['device']}"
            if state.trained_steps else ", already trained")
    if state.stopped_by == "max_minutes" and state.trained_steps:
        rate += (f"; stopped by pretrain.max_minutes={p.max_minutes:g} before pretrain.steps={p.steps} "
                 "(a re-run resumes)")
    return f"pretrain: {state.step} steps{rate}; EMA teacher -> {out / summary['checkpoint']}"


@contextlib.contextmanager
def _loss_log(step: int) -> Iterator[Callable[[int, list[float]], None]]:
    """The loss curve through dvclive, where it is installed (a bare GPU box may lack it: then
    the curve is only in loss.tsv, and the stage says so)."""
    try:
        from dvclive import Live
    except ImportError:
        print("pretrain: dvclive is not installed; the loss curve goes to loss.tsv only")
        yield lambda step, values: None
        return
    if step > 0:
        trim_dvclive(PRETRAIN_LIVE_DIR, step)
    with Live(str(PRETRAIN_LIVE_DIR), save_dvc_exp=False, dvcyaml=None, report=None, resume=step > 0) as live:

        def log(at: int, values: list[float]) -> None:
            live.step = at
            live.log_metric("pretrain/loss", float(np.mean(values)))

        yield log
