"""`textdiff pretrain`: the in-domain teacher (DVC stage), unless the user brought one.

Reads only data/prepared/{train,val}.npz: test images never reach the teacher. Resumable: a
`state.pt` is written every `pretrain.checkpoint_every` steps, and a re-run continues its step count
(the DVC out is `persist: true` so DVC does not delete it first).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from textdiff.data import load_prepared
from textdiff.errors import TextDiffError
from textdiff.overlays import save_png
from textdiff.params import load_params, section_dict
from textdiff.pretrain import CropSampler, PretrainState, new_state, pretrain, resume_state, sample_grid
from textdiff.teacher import Diffusion, normalize_config, save_checkpoint

from textdiff.atomic import atomic_file, write_json
from stages.common import PREPARED_DIR, TEACHER_FILE, provenance, resolve_device

PRETRAIN_SPLITS = ("train", "val")


def unlabeled_images(prepared_dir: Path = PREPARED_DIR) -> np.ndarray:
    """Train + val images only. The masks are not used: pretraining needs no labels."""
    return np.concatenate([load_prepared(prepared_dir, split).images for split in PRETRAIN_SPLITS])


def run(params_path: Path, prepared_dir: Path = PREPARED_DIR) -> None:
    params = load_params(params_path)
    p = params.pretrain
    out = Path(p.out)
    out.mkdir(parents=True, exist_ok=True)
    if params.teacher.checkpoint or params.teacher.kind == "rgb":
        reason = (f"teacher.checkpoint is set ({params.teacher.checkpoint})" if params.teacher.checkpoint
                  else "teacher.kind is rgb (the raw-pixel control needs no teacher)")
        # Only the exported teacher goes (extract must not pick it up); the resumable training
        # state stays, so switching back to the in-domain teacher costs nothing.
        for stale in (out / TEACHER_FILE, out / "teacher.json", out / "samples.png"):
            stale.unlink(missing_ok=True)
        write_json(out / "summary.json", {"skipped": True, "reason": reason})
        print(f"pretrain: skipped, {reason}")
        return
    if not p.config:
        raise TextDiffError(f"{params_path}: pretrain.config is empty (the ADM to train); see README")
    config = normalize_config(p.config)
    device = resolve_device(p.device)
    diffusion = Diffusion(params.teacher.schedule, params.teacher.diffusion_steps)
    sampler = CropSampler(unlabeled_images(prepared_dir), config["image_size"], p.seed)
    state = new_state(config, p.lr, p.weight_decay, p.seed, device)

    state_path, identity = out / "state.pt", {"config": config, "pretrain": section_dict(p)}
    identity_path = out / "state.json"
    resumable = {k: v for k, v in identity["pretrain"].items()
                 if k not in ("steps", "checkpoint_every", "samples", "sample_steps", "device", "export_dtype")}
    if state_path.is_file() and identity_path.is_file():
        old = json.loads(identity_path.read_text())
        old_resumable = {k: v for k, v in old.get("pretrain", {}).items() if k in resumable}
        if old.get("config") != config or old_resumable != resumable:
            print(f"pretrain: {state_path} was made with another config; starting over")
        elif resume_state(state, state_path, sampler, max_step=p.steps):
            print(f"pretrain: resuming at step {state.step} from {state_path}")
        else:
            print(f"pretrain: {state_path} is past pretrain.steps={p.steps}; starting over")
    write_json(identity_path, identity)

    def checkpoint(s: PretrainState) -> None:
        with atomic_file(state_path) as tmp:
            torch.save(s.state_dict(sampler), tmp)

    from dvclive import Live

    with Live("dvclive/pretrain", save_dvc_exp=False, dvcyaml=None, report=None, resume=state.step > 0) as live:
        every = max(1, p.steps // 200)

        def log(step: int, loss: float) -> None:
            if step % every == 0:
                live.step = step
                live.log_metric("pretrain/loss", float(np.mean(state.losses[-every:])))

        pretrain(state, diffusion, sampler, p.steps, p.batch_size, p.lr, p.warmup, p.ema_decay, p.grad_clip,
                 device, checkpoint=checkpoint, checkpoint_every=p.checkpoint_every, on_step=log)

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
    previous = out / "summary.json"
    if not trained and previous.is_file():  # nothing left to train: keep the measured rate
        old = json.loads(previous.read_text())
        for key in ("steps_per_second", "device", "seconds_this_run", "steps_this_run"):
            summary[key] = old.get(key, summary[key])
    save_checkpoint(state.ema, out / TEACHER_FILE,
                    extra_metadata={"steps": state.step, "ema_decay": p.ema_decay, "trained_on": list(PRETRAIN_SPLITS),
                                    "provenance": provenance()},
                    dtype=p.export_dtype)
    if p.samples:
        grid = sample_grid(state.ema, diffusion, p.samples, config["image_size"], p.sample_steps, device, seed=p.seed)
        save_png(out / "samples.png", grid)
    np.savetxt(out / "loss.tsv", np.asarray(state.losses), header="loss", comments="", fmt="%.6f")
    write_json(out / "summary.json", summary)
    rate = f", {trained} this run at {summary['steps_per_second']} steps/s on {device}" if trained else ", already trained"
    print(f"pretrain: {state.step} steps{rate}; EMA teacher -> {out / TEACHER_FILE}")
