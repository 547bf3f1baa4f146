"""`textdiff predict` over a list of inputs: images and whole slides, with a trained model.

Everything the model needs is read from its `model.json` (teacher checkpoint and config, steps,
blocks, text encoder, image size), so a user only names images. A bad image is reported in one
line and skipped; the others are still segmented; the caller's exit code says whether any failed.
Images are written by `segment_image` (`<id>_mask.png`, `<id>_instances.png`: uint16 labels of the
separated nuclei, and a picture), slides by `segment_slide_input` (textdiff.predict.slides does the
tiling); `predictions.h5` and `nuclei.csv` (one row per separated nucleus) are swapped in whole at
the end. Nuclei are separated by the rule in model.json (`model.nuclei`), as evaluate separates them.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from textdiff.atomic import atomic_file, naming_write_failures
from textdiff.data.folder import read_report_table
from textdiff.data.images import read_image, read_mask
from textdiff.data.magnification import MPP_RANGE, plausible, tiff_mpp
from textdiff.data.reports import read_reports, report_for_image
from textdiff.errors import TextDiffError, WriteRefused
from textdiff.evaluation.metrics import image_metrics
from textdiff.evaluation.panels import overlay, panel, panel_caption, save_png
from textdiff.hashing import sha256_file
from textdiff.locks import hold
from textdiff.model.depth import assess
from textdiff.model.nuclei import MAX_LABELS, separate
from textdiff.paths import CLASSIFIER_DIR
from textdiff.predict.collective import gathered
from textdiff.predict.images import Segmenter, build_segmenter, collect_images, megapixels, nucleus_table
from textdiff.predict.records import PredictRecords, file_identity, write_predictions
from textdiff.predict.slides import SlideResult, is_slide, segment_slide
from textdiff.runtime.device import resolve_device
from textdiff.runtime.distributed import Ranks, close_ranks, init_ranks

NUCLEI_COLUMNS = ["image", "label", "area", "area_um2", "centroid_y", "centroid_x", "eccentricity"]


def _previous_predictions(path: Path) -> h5py.File | None:
    """The predictions.h5 of an earlier run (maps of the images this run skips), if readable."""
    if not path.is_file():
        return None
    try:
        return h5py.File(path, "r")
    except OSError:
        return None


def report_for(path: Path, text: str | None, report_rows: dict[str, str] | None, reports: Path | None) -> str:
    if report_rows is None:
        return text or ""
    return report_for_image(report_rows, reports, path)


def ground_truth(path: Path, masks: Path | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """`<masks>/<id>.png` when --masks names a folder holding it (checked against the image size)."""
    if masks is None or not (masks / f"{path.stem}.png").is_file():
        return None
    gt, _ = read_mask(masks / f"{path.stem}.png")
    if gt.shape != shape[:2]:
        raise TextDiffError(f"{masks / (path.stem + '.png')}: mask is {gt.shape[1]}x{gt.shape[0]} but its image "
                            f"{path.name} is {shape[1]}x{shape[0]}")
    return gt


@dataclass
class SegmentedImage:
    prob: np.ndarray
    rows: list[dict]  # one per separated nucleus
    megapixels: float
    scored: bool  # against a ground-truth mask from --masks
    outputs: list[str]  # the files written into --out
    attrs: dict  # its dataset's attributes in predictions.h5


def segment_image(segmenter: Segmenter, path: Path, sentence: str, out: Path, masks: Path | None = None,
                  mpp: float | None = None) -> SegmentedImage:
    """Mask, separated nuclei and picture of one image, written into `out` (each file whole);
    its probability map and nucleus rows are returned for predictions.h5 and nuclei.csv.

    With a ground-truth mask the picture is the evaluation panel (image | truth | prediction |
    errors, scored); without one, the image with each predicted nucleus' contour."""
    image, _ = read_image(path)
    gt = ground_truth(path, masks, image.shape)
    prob, distance = segmenter.maps(image, sentence, mpp)
    image_mpp = mpp or segmenter.source_mpp
    nuclei = separate(prob, distance, segmenter.rule, image_mpp)
    if nuclei.max(initial=0) > MAX_LABELS:
        raise TextDiffError(f"{path}: {int(nuclei.max())} nuclei do not fit a 16-bit label image (at most "
                            f"{MAX_LABELS}); segment it as a slide (a .svs/.ndpi/pyramidal TIFF) or cut it into crops")
    mask = (prob > 0.5).astype(np.uint8)
    save_png(out / f"{path.stem}_mask.png", mask * 255)
    save_png(out / f"{path.stem}_instances.png", nuclei.astype(np.uint16))
    outputs = [f"{path.stem}_mask.png", f"{path.stem}_instances.png"]
    scored = ""
    if gt is None:
        outputs.append(f"{path.stem}_overlay.png")
        save_png(out / outputs[-1], overlay(image, pred=nuclei))
    else:
        m = image_metrics(mask, gt)
        scored = f"; Dice {m['dice']:.3f}, AJI {m['aji']:.3f} against {masks}"
        outputs.append(f"{path.stem}_panel.png")
        save_png(out / outputs[-1], panel(image, gt, mask, panel_caption(path.stem, m), pred_labels=nuclei))
    attrs = {"source": str(path.resolve()), "text": sentence, "description": "foreground (nucleus) probability",
             "mpp": image_mpp}
    familiarity = assess(image, nuclei, image_mpp, segmenter.nucleus_area_um2, segmenter.stain)
    attrs.update({k: v for k, v in familiarity.to_json().items() if v is not None})
    rows = nucleus_table(path.stem, nuclei, image_mpp)
    tqdm.write(f"{path.stem}: {len(rows)} nuclei, {100 * mask.mean():.1f}% covered "
               f"({image.shape[1]}x{image.shape[0]}){scored}")
    warning = familiarity.warning(path.stem, image_mpp, mpp is None)
    if warning:
        attrs["warning"] = warning
        tqdm.write(warning, file=sys.stderr)
    return SegmentedImage(prob, rows, megapixels(image.shape), gt is not None, outputs, attrs)


def segment_slide_input(segmenter: Segmenter, path: Path, sentence: str, out: Path, mpp: float | None,
                        model_identity: dict, overwrite: bool = False, ranks: Ranks = Ranks(),
                        core: int | None = None) -> SlideResult:
    """One whole slide, tile by tile at the model's working resolution (resumable: the identity of
    the model and the text decide whether a stopped run's tiles are reused); its summary line."""
    result = segment_slide(path, lambda rgb: segmenter.maps(rgb, sentence, segmenter.working_mpp, refine=False),
                           out, segmenter.working_mpp, mpp, segmenter.source_mpp,
                           identity={"model": model_identity, "text": sentence}, rule=segmenter.rule,
                           overwrite=overwrite, ranks=ranks, core=core)
    if not ranks.main:
        return result
    if result.skipped:
        tqdm.write(f"{path.stem}: already segmented by this model ({result.nuclei} nuclei); skipped")
        return result
    tqdm.write(f"{path.stem}: {result.nuclei} nuclei in {result.tissue_tiles} of {result.tiles} tiles with tissue "
               f"({result.megapixels / max(result.seconds, 1e-9):.3g} megapixels/s at {segmenter.working_mpp:.3g} "
               f"µm/px) -> {', '.join(p.name for p in result.outputs)}")
    return result


def predict_inputs(inputs: list[Path], out: Path, text: str | None = None, reports: Path | None = None,
        model: Path = CLASSIFIER_DIR, teacher: Path | None = None, scale: float | None = None,
        device: str = "auto", masks: Path | None = None, mpp: float | None = None, whole: bool = False,
        overwrite: bool = False, slide_tile: int | None = None, batch_size: int = 1,
        views: int | None = None) -> int:
    """Returns the number of images that failed (the CLI exits non-zero when it is not 0). Images
    and slides already segmented into `out` by this model, with the same text and settings, are
    skipped (textdiff.predict.records); `overwrite` redoes them."""
    if text is not None and reports is not None:
        raise TextDiffError("give either --text or --reports, not both")
    if slide_tile is not None and not 64 <= slide_tile <= 16384:
        raise TextDiffError(f"--slide-tile is the tile core in working pixels, between 64 and 16384; got {slide_tile}")
    if scale is not None and scale <= 0:
        raise TextDiffError(f"--scale must be > 0, got {scale}")
    if mpp is not None and not plausible(mpp):
        raise TextDiffError(f"--mpp is micrometres per pixel, between {MPP_RANGE[0]} and {MPP_RANGE[1]}; got {mpp}")
    if sum(x is not None and x is not False for x in (scale, mpp, whole or None)) > 1:
        raise TextDiffError("give one of --scale, --mpp and --resize-whole")
    if text is not None and not text.strip():
        raise TextDiffError("--text is empty: pass the image's one-sentence report")
    if out.exists() and not out.is_dir():
        raise TextDiffError(f"{out}: --out must be a folder, and this is a file")
    if masks is not None and not masks.is_dir():
        raise TextDiffError(f"{masks}: --masks must be a folder of <image id>.png masks")
    model_dir = model.parent if model.suffix == ".pt" else model
    paths = collect_images(inputs)
    report_rows = None
    if reports is not None:
        report_rows = read_report_table(reports) if reports.suffix.lower() == ".csv" else read_reports(reports)
    ranks, dev = init_ranks(resolve_device(device))  # under torchrun: this process's place and device
    try:
        return _predict_as(ranks, paths, out, text, report_rows, reports, model_dir, dev, teacher, scale, masks, mpp,
                           whole, overwrite, slide_tile, batch_size, views)
    finally:
        close_ranks(ranks)


def deal_inputs(paths: list[Path], ranks: Ranks) -> list[int]:
    """The indices of `paths` this rank takes part in, in order: every slide (its tiles are dealt
    inside `segment_slide`), and its share of the images, dealt the largest file first, each to the
    rank with the fewest bytes so far (ties to the lowest rank); every rank computes the same deal."""
    if ranks.world == 1:
        return list(range(len(paths)))
    sizes = [p.stat().st_size if p.exists() else 0 for p in paths]
    load, owner = [0] * ranks.world, [-1 if is_slide(p) else 0 for p in paths]
    for k in sorted((k for k in range(len(paths)) if owner[k] == 0), key=lambda k: (-sizes[k], k)):
        r = min(range(ranks.world), key=lambda r: (load[r], r))
        owner[k] = r
        load[r] += sizes[k]
    return [k for k in range(len(paths)) if owner[k] in (-1, ranks.rank)]


def _predict_as(ranks: Ranks, paths: list[Path], out: Path, text: str | None, report_rows, reports: Path | None,
                model_dir: Path, dev, teacher: Path | None, scale: float | None, masks: Path | None,
                mpp: float | None, whole: bool, overwrite: bool, slide_tile: int | None = None,
                batch_size: int = 1, views: int | None = None) -> int:
    """predict_inputs for one process of the job (the only one outside torchrun): it segments its
    share of the inputs; rank 0 then writes predictions.h5, nuclei.csv and the summary from every
    rank's records, in the inputs' order, so the outputs are one process's."""
    segmenter, card = build_segmenter(model_dir, dev, teacher, scale, whole, batch_size, views)
    if views is None and segmenter.views > 1 and ranks.main:
        print(f"test-time augmentation: each image goes through the teacher in {segmenter.views} dihedral views "
              f"and the maps are averaged, as the model was evaluated (extract.eval_views); --views 1 is "
              f"{segmenter.views}x faster")
    if not card.working_mpp and scale is None and not whole and card.spec.mode == "resize":
        print(f"{model_dir}/model.json records no working resolution (trained before data.mpp existed): "
              "images are resized whole, as with --resize-whole")
    assumed: list[str] = []
    unscored: list[str] = []  # --masks was given but holds no <id>.png for these
    model_identity = {f.name: sha256_file(f) for f in (model_dir / "model.json", model_dir / "model.pt")}
    if segmenter.views > 1:  # averaged views are other maps: a record of one view is not this run's
        model_identity["views"] = segmenter.views
    if segmenter.encoder is not None and text is None and report_rows is None:
        raise TextDiffError(f"the model in {model_dir} reads the report text "
                            f"(fusion {card.classifier.fusion}): pass --text \"...\" or "
                            "--reports WORKBOOK.xlsx|reports.csv")

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TextDiffError(f"{out}: cannot create the output folder ({err.strerror})") from None
    with hold(out / ".textdiff.lock", f"the predictions in {out}"):
        failures, done, pixels, skipped = [], [], 0.0, 0
        records = PredictRecords(out, overwrite and ranks.main)
        ranks.barrier()  # rank 0's --overwrite wipe happens before anyone records
        previous = _previous_predictions(out / "predictions.h5")
        started = time.perf_counter()
        mine = deal_inputs(paths, ranks)
        try:
            for index in tqdm(mine, unit="img", desc="predict", dynamic_ncols=True, disable=not ranks.main):
                path = paths[index]
                try:
                    sentence = report_for(path, text, report_rows, reports)
                    if is_slide(path):
                        with naming_write_failures(out / f"{path.stem}.zarr", f"the predictions of slide {path.name}"):
                            result = segment_slide_input(segmenter, path, sentence, out, mpp, model_identity,
                                                         overwrite, ranks, slide_tile)
                        pixels += result.megapixels  # rank 0's counts every process's tiles, the others' 0
                        if ranks.main:  # every process took part in the slide; rank 0 speaks for it
                            assumed.extend([(index, path.name)] if result.mpp_assumed else [])
                            skipped += result.skipped
                        continue
                    own = mpp or tiff_mpp(path)
                    identity = {"model": model_identity, "text": sentence, "source": file_identity(path),
                                "mpp": own, "scale": scale, "whole": whole,
                                "truth": file_identity(masks / f"{path.stem}.png") if masks is not None else None}
                    record = records.finished(path.stem, identity, previous)
                    if record is not None:
                        skipped += 1
                    else:
                        image = segment_image(segmenter, path, sentence, out, masks, own)
                        record = records.save(path.stem, identity, image.outputs, image.prob, image.rows,
                                              image.megapixels, image.scored,
                                              own is None and segmenter.factor(None) is not None and scale is None,
                                              image.attrs)
                        pixels += image.megapixels
                except WriteRefused:
                    raise  # a full disk or read-only --out fails every image after it: stop, resumable
                except TextDiffError as err:
                    if ranks.main or not is_slide(path):  # a slide fails on every process at once
                        failures.append((index, str(err)))
                        tqdm.write(f"error: {err}", file=sys.stderr)
                    continue
                if record.assumed_mpp:
                    assumed.append((index, path.name))
                if masks is not None and not record.scored:
                    unscored.append((index, path.name))
                done.append((index, record))
        finally:
            if previous is not None:
                previous.close()
        # Every rank's results, in the inputs' order (also the barrier before rank 0 rewrites the files
        # the others had open): the outputs are then those of one process that did everything.
        shares = gathered({"done": done, "failures": failures, "assumed": assumed, "unscored": unscored,
                           "pixels": pixels, "skipped": skipped}, ranks)

        def merged(key: str) -> list:
            return [item for _, item in sorted((pair for share in shares for pair in share[key]), key=lambda p: p[0])]

        done, failures, assumed, unscored = (merged(k) for k in ("done", "failures", "assumed", "unscored"))
        pixels, skipped = sum(share["pixels"] for share in shares), sum(share["skipped"] for share in shares)
        if not ranks.main:
            return len(failures)
        if not done and len(failures) == len(paths):
            print(f"no image was segmented: {out / 'predictions.h5'} and {out / 'nuclei.csv'} were not written",
                  file=sys.stderr)
        else:
            header = {"model": str(model_dir.resolve()), "params": json.dumps(card.train),
                      "classifier": json.dumps(card.classifier.to_json()),
                      "teacher_sha256": card.spec.teacher_sha256 or "rgb", "views": segmenter.views}
            write_predictions(out / "predictions.h5", done, records, header, failures)
            with atomic_file(out / "nuclei.csv") as tmp, open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=NUCLEI_COLUMNS)
                writer.writeheader()
                for record in done:
                    writer.writerows(record.rows)
        seconds = time.perf_counter() - started
        if unscored:
            print(f"{len(unscored)} image(s) have no ground truth <id>.png in {masks} and were not scored "
                  f"(first: {unscored[0]})")
        if assumed:
            print(f"{len(assumed)} image(s) with no usable resolution tags (first: {assumed[0]}) were taken at the "
                  f"training images' {segmenter.source_mpp:g} µm/px; pass --mpp if they are not")
        unfamiliar = [r.attrs["warning"] for r in done if r.attrs.get("warning")]
        if unfamiliar:
            first = unfamiliar[0].removeprefix("warning: ")
            print(f"{len(unfamiliar)} image(s) look unlike the training images, so their results are not vouched for "
                  f"(first: {first}); see docs/generalise.md#out-of-depth", file=sys.stderr)
        if skipped:
            print(f"{skipped} of {len(paths)} inputs were already segmented into {out} by this model and were skipped "
                  "(--overwrite redoes them)")
        processes = f" by {ranks.world} processes" if ranks.world > 1 else ""
        print(f"{len(paths) - len(failures)} of {len(paths)} images segmented into {out}{processes} "
              f"({pixels / seconds:.2f} megapixels/s on {dev})" + (f"; {len(failures)} failed" if failures else ""))
        return len(failures)
