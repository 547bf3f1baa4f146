"""`textdiff predict`: segment new images with a trained pipeline (teacher, text, classifier).

Everything the model needs is read from its `model.json` (teacher checkpoint and config, steps,
blocks, text encoder, image size), so a user only names images. A bad image is reported in one
line and skipped; the others are still segmented; the exit code says whether any failed.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import zarr
from tqdm import tqdm

from textdiff.data import IMAGE_SUFFIXES, read_image, read_reports
from textdiff.errors import TextDiffError
from textdiff.overlays import overlay, save_png
from textdiff.predict import Segmenter, megapixels, nucleus_table
from textdiff.teacher import Diffusion, FeatureExtractor, load_teacher, sha256_file
from textdiff.text import TextEncoder

from textdiff.atomic import atomic_file
from stages.common import CLASSIFIER_DIR, resolve_device
from stages.evaluate import load_trained
from stages.extract import PixelFeatures

PREDICT_SUFFIXES = IMAGE_SUFFIXES + (".jpg", ".jpeg")


def collect_images(inputs: list[Path]) -> list[Path]:
    """Files as given; folders expanded to their image files (sorted, hidden files skipped)."""
    paths: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found = sorted(p for p in item.iterdir()
                           if p.is_file() and p.suffix.lower() in PREDICT_SUFFIXES and not p.name.startswith("."))
            if not found:
                raise TextDiffError(f"{item}: folder holds no images ({', '.join(PREDICT_SUFFIXES)})")
            paths.extend(found)
        elif item.exists():
            paths.append(item)
        else:
            raise TextDiffError(f"{item}: no such file or folder")
    if not paths:
        raise TextDiffError("no images given")
    stems = [p.stem for p in paths]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        raise TextDiffError(f"two inputs share the id '{dupes[0]}' (file stem); outputs would collide")
    return paths


def teacher_path_for(meta: dict, model_dir: Path, override: Path | None) -> Path:
    fingerprint = meta["cache_fingerprint"]
    candidates = [override] if override else []
    if meta.get("teacher_path"):
        candidates.append(Path(meta["teacher_path"]))
    cache = Path(meta.get("cache", ""))
    if cache.is_dir():
        try:
            candidates.append(Path(zarr.open_group(str(cache), mode="r").attrs["provenance"]["teacher_path"]))
        except Exception:  # noqa: BLE001 - an unreadable cache is just one less place to look
            pass
    for path in candidates:
        if path and path.is_file():
            if sha256_file(path) != fingerprint["teacher_sha256"]:
                raise TextDiffError(f"{path}: not the teacher {model_dir} was trained with (sha256 differs)")
            return path
    raise TextDiffError(f"{model_dir}/model.json: the teacher it was trained with was not found; pass --teacher PATH")


def build_segmenter(model_dir: Path, device: torch.device, teacher_override: Path | None,
                    scale: float | None) -> tuple[Segmenter, dict]:
    classifier, meta = load_trained(model_dir, device)
    fp = meta["cache_fingerprint"]
    if fp.get("teacher_kind") == "rgb":
        extractor = PixelFeatures()
    else:
        teacher = load_teacher(teacher_path_for(meta, model_dir, teacher_override), fp["teacher_config"])
        extractor = FeatureExtractor(teacher.to(device), Diffusion(fp["schedule"], fp["diffusion_steps"]),
                                     steps=fp["steps"], blocks=fp["blocks"], noise_seed=fp["noise_seed"], device=device)
    encoder = None
    if meta["classifier"]["fusion"] != "none":
        encoder = TextEncoder(fp["text_encoder"], fp["text_max_length"], device)
    mode = fp.get("mode", "resize")
    if mode == "tiles" and scale is not None:
        raise TextDiffError("--scale applies to resize-mode models; this one works at native resolution (tiles)")
    segmenter = Segmenter(extractor=extractor, blocks=list(fp["blocks"]), classifier=classifier, encoder=encoder,
                          image_size=int(fp["image_size"]), mode=mode, tile=int(fp.get("tile", fp["image_size"])),
                          stride=int(fp.get("stride", fp["image_size"])), scale=scale, device=device)
    return segmenter, meta


def run(inputs: list[Path], out: Path, text: str | None = None, reports: Path | None = None,
        model: Path = CLASSIFIER_DIR, teacher: Path | None = None, scale: float | None = None,
        device: str = "auto") -> int:
    """Returns the number of images that failed (the CLI exits non-zero when it is not 0)."""
    if text is not None and reports is not None:
        raise TextDiffError("give either --text or --reports, not both")
    if scale is not None and scale <= 0:
        raise TextDiffError(f"--scale must be > 0, got {scale}")
    model_dir = model.parent if model.suffix == ".pt" else model
    paths = collect_images(inputs)
    report_rows = read_reports(reports) if reports is not None else None
    dev = resolve_device(device)
    segmenter, meta = build_segmenter(model_dir, dev, teacher, scale)
    if segmenter.encoder is not None and text is None and report_rows is None:
        raise TextDiffError(f"the model in {model_dir} reads the report text "
                            f"(fusion {meta['classifier']['fusion']}): pass --text \"...\" or --reports WORKBOOK.xlsx")

    out.mkdir(parents=True, exist_ok=True)
    failures, nuclei, done = [], [], []
    started, pixels = time.perf_counter(), 0.0
    with atomic_file(out / "predictions.h5") as h5_tmp, h5py.File(h5_tmp, "w") as h5:
        h5.attrs.update({"model": str(model_dir.resolve()), "params": json.dumps(meta["train"]),
                         "classifier": json.dumps(meta["classifier"]),
                         "teacher_sha256": meta["cache_fingerprint"].get("teacher_sha256", "rgb")})
        for path in tqdm(paths, unit="img", desc="predict", dynamic_ncols=True):
            image_id = path.stem
            try:
                image, _ = read_image(path)
                if report_rows is not None:
                    if image_id not in report_rows:
                        raise TextDiffError(f"{path}: no report row for '{image_id}' in {reports}")
                    sentence = report_rows[image_id]
                else:
                    sentence = text or ""
                prob = segmenter.probabilities(image, sentence)
            except TextDiffError as err:
                failures.append(str(err))
                tqdm.write(f"error: {err}")
                continue
            mask = (prob > 0.5).astype(np.uint8)
            save_png(out / f"{image_id}_mask.png", mask * 255)
            save_png(out / f"{image_id}_overlay.png", overlay(image, pred=mask))
            ds = h5.create_dataset(image_id, data=prob, compression="gzip")
            ds.attrs.update({"source": str(path.resolve()), "text": sentence,
                             "description": "foreground (nucleus) probability"})
            rows = nucleus_table(image_id, mask)
            nuclei.extend(rows)
            pixels += megapixels(image.shape)
            done.append(image_id)
            tqdm.write(f"{image_id}: {len(rows)} nuclei, {100 * mask.mean():.1f}% covered ({image.shape[1]}x{image.shape[0]})")
    with atomic_file(out / "nuclei.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["image", "label", "area", "centroid_y", "centroid_x", "eccentricity"])
            writer.writeheader()
            writer.writerows(nuclei)
    seconds = time.perf_counter() - started
    print(f"{len(done)} of {len(paths)} images segmented into {out} "
          f"({pixels / seconds:.2f} megapixels/s on {dev})" + (f"; {len(failures)} failed" if failures else ""))
    return len(failures)
