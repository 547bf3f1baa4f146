"""Stage one's work: run the teacher once per image, view and timestep into the zarr cache.

The expensive part of TextDiff is the UNet forward pass; the release recomputes it every epoch. Here
it runs exactly once per (image, view, step): an image's arrays are written, then its `complete`
flag, so an interrupted run resumes at the first unflagged image and never recomputes a finished one.

`plan_cache` turns params + data/prepared into a `CachePlan` (the spec, the per-split layout and
the arrays to feed) without running any model: `textdiff cache verify` uses it alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import zarr
from tqdm import tqdm

from textdiff.atomic import naming_write_failures
from textdiff.cache.spec import CacheSpec, SplitLayout
from textdiff.cache.store import keeping_empty_chunks, open_for_writing, to_storage, verify
from textdiff.data.dataset import SPLITS
from textdiff.data.instances import distance_target, nucleus_distance
from textdiff.data.prepared import PreparedSplit, load_prepared, read_manifest
from textdiff.data.stain import StainShift, apply_shift, draw_shift
from textdiff.data.tiles import cut_tiles
from textdiff.data.views import ViewLayout, apply_view, rotate_like_release
from textdiff.encoders.image import (
    Featurizer,
    TeacherChoice,
    attention_report,
    build_featurizer,
    choose_teacher,
    images_to_model_range,
)
from textdiff.encoders.text import TextEncoder, text_hidden_size
from textdiff.errors import TextDiffError
from textdiff.extract.chunk_files import ImageChunkWriter
from textdiff.extract.writer import BackgroundWriter
from textdiff.hashing import sha256_split
from textdiff.params import Params
from textdiff.paths import CACHE_PATH, PREPARED_DIR
from textdiff.runtime.device import provenance, resolve_device, usable_cpus
from textdiff.runtime.distributed import Ranks, close_ranks, init_ranks
from textdiff.teacher import checkpoint_sha256
from textdiff.teacher.features import PendingFeatures, resolved_window_stride


@dataclass
class SplitInputs:
    """What the teacher and the text encoder are fed for one split (windows in tiles mode)."""

    layout: SplitLayout
    images: np.ndarray  # [N, S, S, 3] uint8
    masks: np.ndarray  # [N, S, S] uint8
    report_texts: list[str]  # one per source image (tiles: repeated per window via layout.tiles)
    release_masks: np.ndarray  # per source image: the released code's ground truth
    full_masks: np.ndarray | None = None  # tiles mode: the source images' masks
    distance: np.ndarray | None = None  # [N, S, S] float32 the instance target per item (data.instances)
    full_instances: np.ndarray | None = None  # [M, F, F] uint16 the source images' label maps
    approximate: np.ndarray | None = None  # [M] bool


@dataclass
class CachePlan:
    spec: CacheSpec
    splits: dict[str, SplitInputs]
    teacher: TeacherChoice | None  # None for the RGB control

    @property
    def layouts(self) -> dict[str, SplitLayout]:
        return {split: inputs.layout for split, inputs in self.splits.items()}


def _load_prepared_for(params: Params, prepared_dir: Path) -> dict[str, PreparedSplit]:
    """data/prepared, refused when it was prepared for another protocol or size."""
    prepared = {split: load_prepared(prepared_dir, split) for split in SPLITS}
    tiled = params.data.mode == "tiles"
    made_with = read_manifest(prepared_dir).get("data_params", {})
    prepared_mode, prepared_protocol = made_with.get("mode", "resize"), made_with.get("protocol", "project")
    if made_with.get("stain", "none") != params.data.stain:
        raise TextDiffError(f"{prepared_dir}: prepared with data.stain={made_with.get('stain', 'none')}, "
                            f"but params ask "
                            f"for data.stain={params.data.stain}; run `textdiff prepare`")
    for data in prepared.values():
        if (prepared_mode != params.data.mode or prepared_protocol != params.data.protocol
                or (not tiled and data.image_size != params.data.image_size)):
            raise TextDiffError(
                f"{prepared_dir}: prepared with data.mode={prepared_mode}, data.protocol={prepared_protocol} at "
                f"{data.image_size} px, but params ask for data.mode={params.data.mode}, "
                f"data.protocol={params.data.protocol}" + ("" if tiled else f" at {params.data.image_size} px")
                + "; run `textdiff prepare`"
            )
    return prepared


def _split_inputs(params: Params, data: PreparedSplit, instances: bool) -> SplitInputs:
    labels = {"full_instances": data.instances, "approximate": data.approximate} if instances else {}
    if params.data.mode != "tiles":
        layout = SplitLayout(ids=list(data.ids), texts=list(data.texts))
        native = data.native_masks if data.native_masks is not None and len(data.native_masks) else None
        distance = None
        if instances:  # the native target, area-averaged to the working size
            distance = np.zeros((len(data), data.image_size, data.image_size), np.float32)
            for k, label_map in enumerate(data.instances):
                distance[k] = distance_target(label_map, data.image_size)
        return SplitInputs(layout, data.images, data.masks, list(data.texts), data.release_masks, full_masks=native,
                           distance=distance, **labels)
    windows = cut_tiles(data.images, data.masks, list(data.ids), list(data.texts), params.data.tile, params.data.stride)
    layout = SplitLayout(ids=windows.ids, texts=windows.texts, tiles=windows.layout)
    distance = None
    if instances:  # the native target, cut into the same windows
        full = [nucleus_distance(x) for x in data.instances]
        tile = params.data.tile
        distance = np.zeros((layout.n, tile, tile), np.float32)
        for w, (k, (y, x)) in enumerate(zip(windows.layout.image_index, windows.layout.origins)):
            distance[w] = full[k][y : y + tile, x : x + tile]
    return SplitInputs(layout, windows.images, windows.masks, list(data.texts), data.release_masks,
                       full_masks=data.masks, distance=distance, **labels)


def plan_cache(params: Params, prepared_dir: Path = PREPARED_DIR) -> CachePlan:
    """The spec and per-split layout the params call for (no model is run)."""
    prepared = _load_prepared_for(params, prepared_dir)
    tiled = params.data.mode == "tiles"
    encoder_id, hidden = text_hidden_size(params.text.encoder)
    # Instance targets ride along only when every split has label maps of one square size.
    shapes = {d.instances.shape[1:] if d.instances is not None else None for d in prepared.values()}
    instances = len(shapes) == 1 and None not in shapes
    common = dict(
        image_size=params.data.tile if tiled else params.data.image_size,
        views=params.extract.views, eval_views=params.extract.eval_views, rotations=params.extract.rotations,
        dtype=params.extract.dtype,
        text_encoder=encoder_id,
        text_hidden_size=hidden, text_max_length=params.text.max_length,
        data={split: sha256_split(list(d.ids), list(d.texts), d.images, d.masks, d.release_masks,
                                  *([d.native_masks] if d.native_masks is not None else []),
                                  *([d.instances, d.approximate] if instances else []))
              for split, d in prepared.items()},
        protocol=params.data.protocol,
        stain=dict(read_manifest(prepared_dir).get("stain") or {}),
        stain_views=params.extract.stain_views,
        stain_sigma=params.extract.stain_sigma if params.extract.stain_views else 0.0,
    )
    if tiled:
        common.update(mode="tiles", tile=params.data.tile, stride=params.data.stride,
                      full_size=int(prepared["train"].images.shape[1]), release_size=params.data.image_size)
    else:  # the source masks ride along for native-resolution scoring, when they share one square size
        native = {d.native_masks.shape[1:] if d.native_masks is not None else None for d in prepared.values()}
        if len(native) == 1 and None not in native:
            common.update(full_size=int(native.pop()[0]))
    if instances and common.get("full_size", 0) == next(iter(shapes))[0]:
        common.update(instances=True)
    instances = bool(common.get("instances", False))
    if params.teacher.kind == "rgb":
        teacher, spec = None, CacheSpec(teacher_kind="rgb", steps=(0,), blocks=(0,), **common)
    else:
        teacher = choose_teacher(params)
        spec = CacheSpec(
            teacher_kind="adm", steps=params.teacher.steps, blocks=params.teacher.blocks,
            teacher_sha256=checkpoint_sha256(teacher.path), teacher_config=teacher.config,
            noise_seed=params.teacher.noise_seed, schedule=params.teacher.schedule,
            diffusion_steps=params.teacher.diffusion_steps, autocast=params.extract.autocast,
            window=params.extract.window,
            window_stride=resolved_window_stride(params.extract.window, params.extract.window_stride),
            **common,
        )
    return CachePlan(spec, {split: _split_inputs(params, d, instances) for split, d in prepared.items()}, teacher)


def write_text(group: zarr.Group, tokens: np.ndarray, mask: np.ndarray, pooled: np.ndarray,
               inputs: SplitInputs | None = None) -> None:
    """The per-split arrays written once (text; in tiles mode also the window layout), then the
    flag that says they are complete."""
    group["text_tokens"][:] = tokens
    group["text_mask"][:] = mask
    group["text_pooled"][:] = pooled
    if inputs is not None:
        group["release_masks"][:] = inputs.release_masks
    tiles = inputs.layout.tiles if inputs is not None else None
    if tiles is not None:
        group["tile_image"][:] = np.asarray(tiles.image_index, np.int32)
        group["tile_origin"][:] = np.asarray(tiles.origins, np.int32).reshape(-1, 2)
    if inputs is not None and inputs.full_masks is not None and "full_masks" in group:
        group["full_masks"][:] = inputs.full_masks
    if inputs is not None and inputs.full_instances is not None and "full_instances" in group:
        group["full_instances"][:] = inputs.full_instances
        group["approximate"][:] = np.asarray(inputs.approximate, np.uint8)
    group.attrs["text_complete"] = True


def rotation_angles(spec: CacheSpec, split: str, n: int) -> np.ndarray:
    """[n, spec.rotations] integer degrees in [-20, 19] (the released code's `randint(-20, 20)`),
    seeded by the noise seed, the split and the image, so a resumed or re-run extract draws the same."""
    split_id = SPLITS.index(split) if split in SPLITS else len(SPLITS)
    return np.stack([np.random.default_rng([spec.noise_seed, split_id, i]).integers(-20, 20, spec.rotations)
                     for i in range(n)]).astype(np.int16) if spec.rotations else np.zeros((n, 0), np.int16)


def stain_shifts(spec: CacheSpec, split: str, n: int) -> np.ndarray:
    """[n, spec.stain_views, 2, 3]: each stain view's HED (scale, bias), drawn U(+-stain_sigma)
    seeded by the noise seed, the split, the image and the copy (a resumed extract draws the same)."""
    split_id = SPLITS.index(split) if split in SPLITS else len(SPLITS)
    out = np.zeros((n, spec.stain_views, 2, 3), np.float32)
    for i in range(n):
        for k in range(spec.stain_views):
            rng = np.random.default_rng([spec.noise_seed, split_id, i, 1 + k, 0x57A1])
            out[i, k] = draw_shift(rng, spec.stain_sigma).as_array()
    return out


def _label_views(maps: np.ndarray, angles: np.ndarray, layout: ViewLayout) -> torch.Tensor:
    """Per-pixel targets [B, H, W] (a mask, the instance target) in every view [B, V, H, W]: turned
    and flipped with the dihedral views, rotated with the rotated copies, as they are in a stain copy."""
    m = torch.from_numpy(np.ascontiguousarray(maps))
    views = []
    for view in range(layout.total):
        kind, k = layout.kind(view)
        if kind == "dihedral":
            views.append(apply_view(m, k))
        elif kind == "rotation":
            views.append(torch.from_numpy(np.stack([rotate_like_release(mk, float(a))
                                                    for mk, a in zip(maps, angles[:, k])])))
        else:
            views.append(m)
    return torch.stack(views, dim=1)


def _views_of(images: np.ndarray, masks: np.ndarray, angles: np.ndarray, shifts: np.ndarray | None,
              layout: ViewLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Model-range images [B, V, 3, H, W] and masks [B, V, H, W] of every view of the layout, in its
    order: the dihedral views, the rotated copies (`angles` [B, R]), the stain copies (`shifts`
    [B, K, 2, 3]; a stain copy's mask is the image's own)."""
    x = images_to_model_range(images)
    x_views = []
    for view in range(layout.total):
        kind, k = layout.kind(view)
        if kind == "dihedral":
            x_views.append(apply_view(x, k))
        elif kind == "rotation":
            rotated = np.stack([rotate_like_release(im, float(a)) for im, a in zip(images, angles[:, k])])
            x_views.append(images_to_model_range(rotated))
        else:
            stained = np.stack([apply_shift(im, StainShift.from_array(s)) for im, s in zip(images, shifts[:, k])])
            x_views.append(images_to_model_range(stained))
    return torch.stack(x_views, dim=1), _label_views(masks, angles, layout)


def _write_batch(arrays: dict[str, ImageChunkWriter], complete: zarr.Array, spec: CacheSpec, views: int,
                 index: np.ndarray, pending: PendingFeatures, m_views: torch.Tensor, images: np.ndarray,
                 writer: BackgroundWriter, d_views: torch.Tensor | None = None) -> None:
    """One batch's images into their chunks (at once where the writer has workers; zarr's bytes,
    written without zarr's per-chunk overhead, see chunk_files), then the images' completion flags,
    each only after all the batch's arrays are on disk."""
    try:
        feats = pending.wait()

        def put(write: ImageChunkWriter, i: int, value: torch.Tensor | np.ndarray) -> None:
            write(i, to_storage(value, spec.dtype) if torch.is_tensor(value) else value)

        per_image = {b: f.unflatten(0, (len(index), views)) for b, f in feats.items()}  # [B, views, steps, C, h, w]
        writes = []
        for j, i in enumerate(index):
            for b, f in per_image.items():
                writes.append(partial(put, arrays[f"block_{b}"], int(i), f[j]))
            writes.append(partial(put, arrays["masks"], int(i), m_views[j].numpy()))
            writes.append(partial(put, arrays["images"], int(i), images[i]))
            if d_views is not None:
                writes.append(partial(put, arrays["distance"], int(i), d_views[j].numpy().astype(np.float16)))
        writer.write_all(writes)
        for i in index:
            complete[int(i)] = 1  # last: image i now counts
    finally:
        pending.release()


def extract_split(group: zarr.Group, spec: CacheSpec, images: np.ndarray, masks: np.ndarray,
                  featurizer: Featurizer, batch_size: int, device: torch.device, desc: str = "",
                  ranks: Ranks = Ranks(), distance: np.ndarray | None = None) -> dict:
    """Fill every unflagged image of one split; returns counts and timing for the summary.

    Under torchrun the unflagged images are cut into the batches one process would run and the
    batches are dealt round robin to the ranks: every batch is computed exactly as a single process
    computes it (so the cache is bit-identical), and each rank writes only its own images' chunks
    (one image per chunk) and completion flags.
    """
    todo = np.flatnonzero(group["complete"][:] == 0)
    layout = spec.split_view_layout(group.basename)  # val and test may hold test-time views
    # The rotated views' angles, as rank 0 stored them (before any rank got here).
    angles = np.asarray(group["rotation_angles"][:]) if spec.rotations else np.zeros((len(images), 0), np.int16)
    shifts = np.asarray(group["stain_shifts"][:]) if spec.stain_views else None
    batches = ranks.share([todo[s : s + batch_size] for s in range(0, len(todo), batch_size)])
    mine = int(sum(len(b) for b in batches))
    label = desc if ranks.world == 1 else f"{desc} (rank {ranks.rank}/{ranks.world})"
    submit = getattr(featurizer, "submit", None)  # the teacher's: the host copy overlaps the next batch
    started = time.perf_counter()
    names = [*(f"block_{b}" for b in spec.blocks), "masks", "images", *(["distance"] if spec.instances else [])]
    arrays = {name: ImageChunkWriter(group[name]) for name in names}
    complete = group["complete"]
    workers = usable_cpus()
    with (tqdm(total=mine, unit="img", desc=label, dynamic_ncols=True, disable=mine == 0 or not ranks.main) as bar,
          BackgroundWriter(threaded=device.type == "cuda", workers=workers) as writer):
        for index in batches:
            x_views, m_views = _views_of(images[index], masks[index], angles[index],
                                         shifts[index] if shifts is not None else None, layout)
            d_views = (_label_views(distance[index], angles[index], layout)
                       if spec.instances and distance is not None else None)
            x = x_views.flatten(0, 1).to(device)
            pending = submit(x) if submit is not None else PendingFeatures(featurizer(x))
            writer.submit(partial(_write_batch, arrays, complete, spec, layout.total, index, pending, m_views, images,
                                  writer, d_views))
            bar.update(len(index))
    seconds = time.perf_counter() - started
    return {"done": mine, "skipped": int(group["complete"].shape[0] - len(todo)), "seconds": seconds}


def extract_cache(params: Params, cache_path: Path = CACHE_PATH, rebuild: bool = True,
                  prepared_dir: Path = PREPARED_DIR) -> CachePlan:
    """Fill (or resume) the cache the params call for; verify it before returning.

    Under torchrun (WORLD_SIZE > 1) rank 0 creates or resumes the cache and writes what is shared
    (layout, spec, report embeddings, rotation angles) while the others wait; then every rank fills
    its share of the images; rank 0 verifies the whole cache last.
    """
    plan = plan_cache(params, prepared_dir)
    ranks, device = init_ranks(resolve_device(params.extract.device))
    try:
        # Every chunk on disk, so verify can tell a lost one; a full disk or read-only folder is one line
        # (chunks are whole or absent and an image is flagged complete last, so a re-run continues).
        with keeping_empty_chunks(), naming_write_failures(cache_path, "the feature cache"):
            # Load the models first: a bad checkpoint or encoder must fail before the cache is touched.
            featurizer = build_featurizer(plan.spec, plan.teacher.path if plan.teacher else None, device,
                                          out_dtype=getattr(torch, plan.spec.dtype), compile=params.extract.compile)
            if ranks.main:
                _prepare_shared(params, plan, cache_path, rebuild, device)
            ranks.barrier()
            root = zarr.open_group(str(cache_path), mode="r+", zarr_format=3)
            for split, inputs in plan.splits.items():
                stats = extract_split(root[split], plan.spec, inputs.images, inputs.masks, featurizer,
                                      params.extract.batch_size, device, desc=f"extract {split}", ranks=ranks,
                                      distance=inputs.distance)
                rate = stats["done"] / stats["seconds"] if stats["done"] and stats["seconds"] > 0 else 0.0
                if ranks.main:
                    print(f"{split}: {stats['done']} extracted"
                          + (f" by rank 0 of {ranks.world}" if ranks.world > 1 else "")
                          + f", {stats['skipped']} already cached" + (f", {rate:.2f} img/s" if stats["done"] else ""))
            ranks.barrier()
            if ranks.main:
                problems = verify(cache_path, plan.spec, plan.layouts)
                if problems:
                    raise TextDiffError(problems[0])
    finally:
        close_ranks(ranks)
    return plan


def _prepare_shared(params: Params, plan: CachePlan, cache_path: Path, rebuild: bool, device: torch.device) -> None:
    """Rank 0's part before the images: open or create the cache, and write the report embeddings
    rotation angles and stain shifts of every split (arrays of one chunk per split, so one writer)."""
    encoder = TextEncoder(params.text.encoder, params.text.max_length, device)  # fails before the cache is touched
    for line in attention_report(plan.spec):
        if line:
            print(line)
    info = dict(provenance(), teacher_path=str(plan.teacher.path) if plan.teacher else "rgb", device=device.type)
    root = open_for_writing(cache_path, plan.spec, plan.layouts, info, rebuild=rebuild)
    for split, inputs in plan.splits.items():
        group = root[split]
        if not group.attrs.get("text_complete", False):
            emb = encoder.encode(inputs.report_texts)
            if inputs.layout.tiles is not None:  # one report per source image, repeated for its windows
                index = inputs.layout.tiles.image_index
                emb.tokens, emb.mask, emb.pooled = (a[index] for a in (emb.tokens, emb.mask, emb.pooled))
            if plan.spec.rotations:
                group["rotation_angles"][:] = rotation_angles(plan.spec, split, inputs.layout.n)
            if plan.spec.stain_views:
                group["stain_shifts"][:] = stain_shifts(plan.spec, split, inputs.layout.n)
            write_text(group, emb.tokens, emb.mask, emb.pooled, inputs)


def verify_cache(params: Params, cache_path: Path = CACHE_PATH,
                 prepared_dir: Path = PREPARED_DIR) -> tuple[list[str], list[str]]:
    """(every reason the cache is not the one these params call for (empty = it is), notes on
    where the teacher attends)."""
    plan = plan_cache(params, prepared_dir)
    notes = [line for line in attention_report(plan.spec) if line]
    return verify(cache_path, plan.spec, plan.layouts), notes
