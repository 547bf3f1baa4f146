"""`textdiff pretrain`: the in-domain teacher (DVC stage), unless the user brought one.

Reads only data/prepared/{train,val}.npz: test images never reach the teacher. Resumable: a
`state.pt` is written every `pretrain.checkpoint_every` steps, and a re-run continues its step count
(the DVC out is `persist: true` so DVC does not delete it first).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from textdiff.atomic import atomic_file, remove_stale_temporaries, write_json
from textdiff.data import load_prepared
from textdiff.errors import TextDiffError
from textdiff.overlays import save_png
from textdiff.params import Params, load_params, section_dict
from textdiff.pretrain import CropSampler, PretrainState, new_state, pretrain, resume_state, sample_grid
from textdiff.teacher import Diffusion, normalize_config, save_checkpoint
from textdiff.teacher.checkpoint import sidecar_path

from stages.common import PREPARED_DIR, TEACHER_FILE, provenance, resolve_device

PRETRAIN_SPLITS = ("train", "val")


def unlabeled_images(prepared_dir: Path = PREPARED_DIR) -> np.ndarray:
    """Train + val images only. The masks are not used: pretraining needs no labels."""
    return np.concatenate([load_prepared(prepared_dir, split).images for split in PRETRAIN_SPLITS])


def images_sha256(images: np.ndarray) -> str:
    """What the teacher was trained on, as one hash: recorded in the checkpoint and the sidecar."""
    h = hashlib.sha256(str(images.shape).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()


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


def run(params_path: Path, prepared_dir: Path = PREPARED_DIR) -> None:
    params = load_params(params_path)
    p = params.pretrain
    out = Path(p.out)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    if params.teacher.checkpoint or params.teacher.kind == "rgb":
        reason = (f"teacher.checkpoint is set ({params.teacher.checkpoint})" if params.teacher.checkpoint
                  else "teacher.kind is rgb (the raw-pixel control needs no teacher)")
        # Only the exported teacher goes (extract must not pick it up by accident); the resumable
        # training state stays, so switching back to the in-domain teacher costs nothing. A
        # teacher.checkpoint that names the export itself is the user's choice and is kept.
        brought = Path(params.teacher.checkpoint).resolve() if params.teacher.checkpoint else None
        for stale in (out / TEACHER_FILE, out / "teacher.json", out / "samples.png"):
            if brought is not None and stale.resolve() in (brought, sidecar_path(brought)):
                continue
            stale.unlink(missing_ok=True)
        write_json(out / "summary.json", {"skipped": True, "reason": reason})
        print(f"pretrain: skipped, {reason}")
        return
    if not p.config:
        raise TextDiffError(f"{params_path}: pretrain.config is empty (the ADM to train); see README")
    config = normalize_config(p.config)
    device = resolve_device(p.device)
    diffusion = Diffusion(params.teacher.schedule, params.teacher.diffusion_steps)
    images = unlabeled_images(prepared_dir)
    data_sha = images_sha256(images)
    sampler = CropSampler(images, config["image_size"], p.seed)
    state = new_state(config, p.lr, p.weight_decay, p.seed, device)

    identity_dict = training_identity(params, data_sha)
    identity = json.dumps(identity_dict, sort_keys=True)
    state_path = out / "state.pt"
    if state_path.is_file():
        outcome = resume_state(state, state_path, sampler, p.steps, identity)
        if outcome == "resumed":
            print(f"pretrain: resuming at step {state.step} from {state_path}")
        elif outcome == "past":
            print(f"pretrain: {state_path} is past pretrain.steps={p.steps}; starting over (it is overwritten at the first checkpoint)")
        else:
            print(f"pretrain: {state_path} was made with another config, hyper-parameters, schedule or images; starting over")
    write_json(out / "state.json", identity_dict)  # for people; the copy inside state.pt is what counts

    def checkpoint(s: PretrainState) -> None:
        try:
            with atomic_file(state_path) as tmp:
                torch.save(s.state_dict(sampler, identity), tmp)
        except OSError as err:
            raise TextDiffError(f"{state_path}: cannot write the pretraining checkpoint ({err.strerror or err})") from None

    from dvclive import Live

    live_dir = Path("dvclive/pretrain")
    if state.step > 0:
        trim_dvclive(live_dir, state.step)
    with Live(str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None, resume=state.step > 0) as live:
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
        try:
            old = json.loads(previous.read_text())
        except (OSError, ValueError):
            old = {}
        if isinstance(old, dict) and not old.get("skipped"):
            for key in ("steps_per_second", "device", "seconds_this_run", "steps_this_run"):
                summary[key] = old.get(key, summary[key])
    try:
        save_checkpoint(state.ema, out / TEACHER_FILE, dtype=p.export_dtype, extra_metadata={
            "steps": state.step, "ema_decay": p.ema_decay, "trained_on": list(PRETRAIN_SPLITS),
            "images_sha256": data_sha, "schedule": params.teacher.schedule,
            "diffusion_steps": params.teacher.diffusion_steps, "provenance": provenance()})
        if p.samples:
            grid = sample_grid(state.ema, diffusion, p.samples, config["image_size"], p.sample_steps, device, seed=p.seed)
            with atomic_file(out / "samples.png") as tmp:
                save_png(tmp, grid, format="PNG")
        with atomic_file(out / "loss.tsv") as tmp:
            np.savetxt(tmp, np.asarray(state.losses), header="loss", comments="", fmt="%.6f")
        write_json(out / "summary.json", summary)
    except OSError as err:
        raise TextDiffError(f"{out}: cannot write the exported teacher ({err.strerror or err})") from None
    rate = f", {trained} this run at {summary['steps_per_second']} steps/s on {device}" if trained else ", already trained"
    print(f"pretrain: {state.step} steps{rate}; EMA teacher -> {out / TEACHER_FILE}")
