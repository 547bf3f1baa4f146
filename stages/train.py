"""Stage `train`: the pixel classifier on cache/features.zarr (DVC stage two, first half), or with
`baseline.kind` the U-Net baseline on the cached pixels (classic: nothing to train)."""

from __future__ import annotations

import dataclasses
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

from textdiff.atomic import write_json
from textdiff.baselines.cellpose import save_cellpose
from textdiff.baselines.unet import build_unet, save_baseline
from textdiff.cache.store import FeatureCache
from textdiff.data.magnification import working_mpp
from textdiff.locks import hold, lock_path
from textdiff.model.card import TEXTDIFF, ModelCard, load_classifier, save_trained
from textdiff.model.classifier import train_params_problem
from textdiff.model.nuclei import RuleChoice
from textdiff.params import Params, load_params, section_dict
from textdiff.paths import CACHE_PATH, CLASSIFIER_DIR, METRICS_DIR, PREPARED_DIR, TRAIN_LIVE_DIR
from textdiff.runtime.device import device_name, provenance, resolve_autocast, resolve_device
from textdiff.runtime.distributed import Ranks, close_ranks, init_ranks
from textdiff.runtime.launch import relaunch_under_torchrun
from textdiff.train.cellpose import check_cellpose, train_cellpose
from textdiff.train.nuclei_rule import choose_nuclei_rule, training_nucleus_area
from textdiff.train.resume import Checkpoint, resume_path, training_identity
from textdiff.train.training import EpochRecord, check_target, schedule_for, train_classifier, train_unet


def run(params_path: Path, cache_path: Path = CACHE_PATH, out_dir: Path = CLASSIFIER_DIR,
        prepared_dir: Path = PREPARED_DIR) -> None:
    params = load_params(params_path)
    t = params.train
    params.refuse(train_params_problem(t.fusion, t.classifier, t.decoder_norm, t.contrastive_weight,
                                        t.distance_decoder, t.autocast))
    if params.baseline.kind == "cellpose" and t.nproc > 1:
        params.refuse("baseline.kind=cellpose trains in one process (cellpose's own loop); set train.nproc: 1")
    with hold(lock_path(out_dir), f"the model folder {out_dir}"):
        if params.train.nproc > 1 and "WORLD_SIZE" not in os.environ:
            relaunch_under_torchrun(params.train.nproc, ["train", "--params", str(params_path)])
            return
        _run_ranks(params, cache_path, out_dir, prepared_dir)


def _run_ranks(params: Params, cache_path: Path, out_dir: Path, prepared_dir: Path) -> None:
    ranks, device = init_ranks(resolve_device(params.train.device))
    try:
        _train(params, ranks, device, cache_path, out_dir, prepared_dir)
    finally:
        close_ranks(ranks)


def _nuclei_rule(kind: str, model, cache: FeatureCache, device: torch.device, mpp: float,
                 prepared_dir: Path) -> RuleChoice | None:
    started = time.perf_counter()
    choice = choose_nuclei_rule(kind, model, cache, device, mpp, prepared_dir)
    if choice is None:
        print("nuclei: no per-nucleus ground truth on val; the default nucleus rule is recorded")
    else:
        r = choice.rule
        print(f"nuclei: rule chosen on val (mean AJI {choice.score:.4f}, PQ {choice.pq:.4f}; "
              f"{len(choice.tried)} tries, "
              f"{time.perf_counter() - started:.0f}s): seeds {r.seeds}, marker {r.marker}, "
              f"min area {r.min_area_um2} um2, refined by the image within {r.refine_um} um")
    return choice


def _rule_fields(choice: RuleChoice | None) -> dict:
    return {"nuclei": choice.rule.to_json(), "val_aji_instance": choice.score} if choice else {}


def _rule_metrics(choice: RuleChoice | None) -> dict:
    return {"val_aji_instance": round(choice.score, 6), "val_pq_instance": round(choice.pq, 6)} if choice else {}


def _train_cellpose(params: Params, cache: FeatureCache, device: torch.device, out_dir: Path, prepared_dir: Path,
                    live) -> None:
    """Cellpose from scratch by its own loop, its thresholds chosen on val; its losses into dvclive."""
    started = time.perf_counter()
    result = train_cellpose(cache, prepared_dir, params.train, params.baseline, device)
    for epoch, loss in enumerate(result.losses.train):
        live.log_metric("train/loss", loss)
        if epoch in result.losses.val:
            live.log_metric("val/loss", result.losses.val[epoch])
        live.next_step()
    choice, rule = result.choice, result.rule
    if choice is None:
        print("cellpose: no per-nucleus ground truth on val; cellpose's default thresholds are recorded")
    else:
        print(f"cellpose: thresholds chosen on val (mean AJI {choice.aji:.4f}, PQ {choice.pq:.4f}; "
              f"{len(choice.tried)} tries, {result.choice_seconds:.0f}s): cellprob {rule.cellprob_threshold}, "
              f"flow {rule.flow_threshold}")
    scores = {"val_aji_instance": round(choice.aji, 6), "val_pq_instance": round(choice.pq, 6)} if choice else {}
    save_cellpose(out_dir, cache.spec, result.config, result.state, rule, {
        "train": section_dict(params.train), "baseline": section_dict(params.baseline), "train_ids": result.train_ids,
        "thresholds_tried": choice.tried_json() if choice else [], "provenance": provenance(), **scores})
    seconds = time.perf_counter() - started
    epochs = params.baseline.cellpose_epochs
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    write_json(METRICS_DIR / "train.json", {
        "baseline": "cellpose", "num_train": result.num_train, "epochs": epochs,
        "crops_per_epoch": params.baseline.cellpose_crops_per_epoch or result.num_train,
        "train_loss": round(result.losses.train[-1], 6), "diameter_px": round(rule.diameter, 3),
        "cellprob_threshold": rule.cellprob_threshold, "flow_threshold": rule.flow_threshold,
        "seconds": round(seconds, 1), "seconds_per_epoch": round(result.train_seconds / epochs, 2),
        "threshold_seconds": round(result.choice_seconds, 1), "peak_rss_mib": round(peak_rss_mib, 1), **scores})
    print(f"baseline.kind=cellpose: {out_dir}/model.pt written ({seconds:.0f}s, of which training "
          f"{result.train_seconds:.0f}s, {result.train_seconds / epochs:.1f}s per epoch; "
          f"peak RSS {peak_rss_mib:.0f} MiB)")


def _train(params: Params, ranks: Ranks, device: torch.device, cache_path: Path, out_dir: Path,
           prepared_dir: Path) -> None:
    cache = FeatureCache(cache_path)
    if params.train.autocast == "auto":  # resolved once, so the card, the resume identity and train.json agree
        autocast = resolve_autocast("auto", device)
        params = dataclasses.replace(params, train=dataclasses.replace(params.train, autocast=autocast))
        if ranks.main and params.baseline.kind == "none":
            print(f"train.autocast auto: the classifier computes in {autocast} on {device_name(device)}")
    if params.baseline.kind == "none":
        check_target(params.train.target, cache.spec)  # before any work
    elif params.baseline.kind == "cellpose":
        check_cellpose(cache.spec, params.train)  # before any work: instances, the package
    from dvclive import Live

    started = time.perf_counter()
    # Rank 0 alone writes (dvclive, the model, the metrics); the others train their part and stop.
    live_dir = str(TRAIN_LIVE_DIR) if ranks.main else tempfile.mkdtemp(prefix="textdiff-live-")
    with Live(live_dir, save_dvc_exp=False, dvcyaml=None, report=None) as live:
        def log(record: EpochRecord) -> None:
            live.log_metric("train/loss", record.train_loss)
            live.log_metric("val/dice", record.val_dice)
            live.log_metric("val/iou", record.val_iou)
            live.next_step()

        if params.baseline.kind == "cellpose":
            _train_cellpose(params, cache, device, out_dir, prepared_dir, live)
            return
        if params.baseline.kind == "classic":  # nothing to learn: the card says what evaluate should run
            if not ranks.main:
                shutil.rmtree(live_dir, ignore_errors=True)
                return
            choice = _nuclei_rule("classic", None, cache, device, params.data.mpp, prepared_dir)
            save_baseline(out_dir, "classic", cache.spec, section_dict(params.train), **_rule_fields(choice))
            write_json(METRICS_DIR / "train.json", {"baseline": "classic", "num_train": 0, "seconds": 0.0,
                                                    **_rule_metrics(choice)})
            print(f"baseline.kind=classic: hematoxylin + Otsu, no training; {out_dir}/model.json written")
            return
        checkpoint = Checkpoint(resume_path(out_dir), training_identity(
            section_dict(params.train), section_dict(params.baseline), cache.spec.to_json(), ranks.world, device.type),
            writer=ranks.main)
        if params.baseline.kind == "unet":
            result = train_unet(cache, params.train, params.baseline, device, on_epoch=log, ranks=ranks,
                                checkpoint=checkpoint)
        else:
            result = train_classifier(cache, params.train, device, on_epoch=log, ranks=ranks, checkpoint=checkpoint)
    seconds = time.perf_counter() - started
    schedule = schedule_for(params.train, result.num_train)
    if not ranks.main:
        shutil.rmtree(live_dir, ignore_errors=True)
        return

    if params.baseline.kind == "unet":
        model = build_unet(result.config)
        model.load_state_dict(result.state)
        choice = _nuclei_rule("unet", model.to(device).eval(), cache, device, params.data.mpp, prepared_dir)
        save_baseline(out_dir, "unet", cache.spec, section_dict(params.train), result.state, result.config, result,
                      **_rule_fields(choice))
    else:
        choice = _nuclei_rule(TEXTDIFF, load_classifier(result.state, result.config, device), cache, device,
                              params.data.mpp, prepared_dir)
        card = ModelCard(classifier=result.config, spec=cache.spec, train=section_dict(params.train),
                         best_epoch=result.best_epoch, best_val_dice=result.best_val_dice,
                         best_val_iou=result.best_val_iou, train_ids=result.train_ids, cache=str(cache_path),
                         teacher_path=cache.provenance.get("teacher_path"), provenance=provenance(),
                         source_mpp=params.data.mpp,
                         working_mpp=working_mpp(params.data.mpp, cache.spec.mode, cache.spec.image_size,
                                                 cache.spec.full_size),
                         nucleus_area_um2=round(training_nucleus_area(cache, params.data.mpp), 3),
                         **_rule_fields(choice))
        save_trained(out_dir, result.state, card)
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    write_json(METRICS_DIR / "train.json", {
        **({"baseline": "unet"} if params.baseline.kind == "unet" else {}),
        "best_epoch": result.best_epoch,
        "best_step": result.best_step,
        "steps": schedule.total_steps,
        "val_dice": result.best_val_dice,
        "val_iou": result.best_val_iou,
        "num_train": result.num_train,
        "seconds": round(seconds, 1),
        "seconds_per_epoch": round(seconds / schedule.rounds, 2),  # per validation round with train.steps
        "peak_rss_mib": round(peak_rss_mib, 1),  # rank 0's
        "processes": ranks.world,
        **({} if params.baseline.kind == "unet" else {"autocast": result.config.autocast}),
        **({"resumed_from_step": result.resumed_step} if result.resumed_step else {}),  # seconds: this run's
        **_rule_metrics(choice),
    })
    checkpoint.remove()  # the model and its metrics are whole: nothing left to resume
    print(f"best val dice {result.best_val_dice:.4f} at {schedule.unit} {result.best_epoch} (step {result.best_step}); "
          f"{out_dir}/model.pt written ({seconds:.0f}s, peak RSS {peak_rss_mib:.0f} MiB)")
