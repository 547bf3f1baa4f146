"""`textdiff extract`: teacher features + report embeddings -> cache/features.zarr (DVC stage one)."""

from __future__ import annotations

from pathlib import Path

import torch

from textdiff.cache import SplitSpec, open_for_writing, verify
from textdiff.data import SPLITS, load_prepared, read_manifest
from textdiff.errors import TextDiffError
from textdiff.extract import cut_tiles, data_fingerprint, extract_split, write_text
from textdiff.params import Params, load_params
from textdiff.teacher import Diffusion, FeatureExtractor, load_teacher, normalize_config, sha256_file
from textdiff.teacher.features import block_shapes
from textdiff.text import TextEncoder, resolve_encoder

from stages.common import CACHE_PATH, PREPARED_DIR, provenance, resolve_device, resolve_teacher


def text_hidden_size(encoder: str) -> tuple[str, int]:
    """(encoder id, hidden size) from the model's config alone: cheap, for verify."""
    from transformers import AutoConfig

    source, encoder_id = resolve_encoder(encoder)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    except Exception:  # noqa: BLE001
        # Not local: the full load will give the one-line "hub unreachable" message.
        return encoder_id, TextEncoder(encoder).hidden_size
    return encoder_id, int(config.hidden_size)


def expected_cache(params: Params, cache_path: Path = CACHE_PATH) -> tuple[dict, dict[str, SplitSpec], object]:
    """The fingerprint and per-split layout the params call for (no model is run)."""
    encoder_id, hidden = text_hidden_size(params.text.encoder)
    prepared = {split: load_prepared(PREPARED_DIR, split) for split in SPLITS}
    tiled = params.data.mode == "tiles"
    size = params.data.tile if tiled else params.data.image_size
    prepared_mode = read_manifest(PREPARED_DIR).get("data_params", {}).get("mode", "resize")
    for split, data in prepared.items():
        if prepared_mode != params.data.mode or (not tiled and data.image_size != size):
            raise TextDiffError(
                f"{PREPARED_DIR}: prepared with data.mode={prepared_mode} at {data.image_size} px, but params ask for "
                f"data.mode={params.data.mode}" + ("" if tiled else f" at {size} px") + "; run `textdiff prepare`"
            )
    windows = {}
    if tiled:
        for split, d in prepared.items():
            windows[split] = cut_tiles(d.images, d.masks, list(d.ids), list(d.texts), params.data.tile,
                                       params.data.stride)
    if params.teacher.kind == "rgb":
        # The control: the classifier sees the image itself as its only "feature block".
        teacher, shapes, steps, blocks = None, {0: (3, size, size)}, [0], [0]
        identity = {"teacher_kind": "rgb"}
    else:
        teacher = resolve_teacher(params)
        config = normalize_config(teacher.config)
        steps, blocks = list(params.teacher.steps), list(params.teacher.blocks)
        shapes = block_shapes(config, blocks, image_size=size)
        identity = {
            "teacher_kind": "adm",
            "teacher_sha256": sha256_file(teacher.path),
            "teacher_config": config,
            "noise_seed": params.teacher.noise_seed,
            "schedule": params.teacher.schedule,
            "diffusion_steps": params.teacher.diffusion_steps,
        }
    specs = {
        split: SplitSpec(
            ids=windows[split][3] if tiled else list(data.ids),
            texts=windows[split][4] if tiled else list(data.texts),
            image_size=size, views=params.extract.views,
            steps=len(steps), block_shapes=shapes, text_length=params.text.max_length,
            text_dim=hidden, dtype=params.extract.dtype, tiles=windows[split][2] if tiled else None,
        )
        for split, data in prepared.items()
    }
    fingerprint = {
        **identity,
        "steps": steps,
        "blocks": blocks,
        "image_size": size,
        "views": params.extract.views,
        "dtype": params.extract.dtype,
        "text_encoder": encoder_id,
        "text_hidden_size": hidden,
        "text_max_length": params.text.max_length,
        "data": {split: data_fingerprint(list(d.ids), list(d.texts), d.images, d.masks) for split, d in prepared.items()},
    }
    if tiled:  # (resize-mode fingerprints stay as they were: existing caches remain valid)
        fingerprint.update(mode="tiles", tile=params.data.tile, stride=params.data.stride,
                           full_size=int(prepared["train"].images.shape[1]))
    inputs = {split: (windows[split][0], windows[split][1]) if tiled else (d.images, d.masks)
              for split, d in prepared.items()}
    return fingerprint, specs, (teacher, prepared, inputs)


class PixelFeatures:
    """The raw-RGB control in the teacher's place: images [B, 3, H, W] -> {0: [B, 1, 3, H, W]}."""

    def __call__(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        return {0: images.detach().float().cpu()[:, None]}


def run(params_path: Path, rebuild: bool = True, cache_path: Path = CACHE_PATH) -> None:
    params = load_params(params_path)
    fingerprint, specs, (teacher, prepared, inputs) = expected_cache(params, cache_path)
    device = resolve_device(params.extract.device)
    # Load both models first: a bad checkpoint or encoder must fail before the cache is touched.
    if teacher is None:
        extractor = PixelFeatures()
    else:
        model = load_teacher(teacher.path, teacher.config).to(device)
        diffusion = Diffusion(params.teacher.schedule, params.teacher.diffusion_steps)
        extractor = FeatureExtractor(
            model, diffusion, steps=params.teacher.steps, blocks=params.teacher.blocks,
            noise_seed=params.teacher.noise_seed, device=device,
        )
    encoder = TextEncoder(params.text.encoder, params.text.max_length, device)
    info = dict(provenance(), teacher_path=str(teacher.path) if teacher else "rgb", device=str(device))
    root = open_for_writing(cache_path, fingerprint, specs, info, rebuild=rebuild)

    for split in SPLITS:
        group, data, spec = root[split], prepared[split], specs[split]
        if not group.attrs.get("text_complete", False):
            emb = encoder.encode(list(data.texts))
            if spec.tiles is not None:  # one report per source image, repeated for its windows
                emb.tokens, emb.mask, emb.pooled = (a[spec.tiles.image_index] for a in (emb.tokens, emb.mask, emb.pooled))
            write_text(group, emb.tokens, emb.mask, emb.pooled, spec, data.masks)
        images, masks = inputs[split]
        stats = extract_split(group, spec, images, masks, extractor,
                              params.extract.batch_size, device, desc=f"extract {split}")
        rate = stats["done"] / stats["seconds"] if stats["done"] and stats["seconds"] > 0 else 0.0
        print(f"{split}: {stats['done']} extracted, {stats['skipped']} already cached"
              + (f", {rate:.2f} img/s" if stats["done"] else ""))

    problems = verify(cache_path, fingerprint, specs)
    if problems:
        raise TextDiffError(problems[0])
    size = sum(f.stat().st_size for f in Path(cache_path).rglob("*") if f.is_file())
    n = sum(spec.n for spec in specs.values())
    print(f"{cache_path}: {n} images, {size / 2**20:.1f} MiB on disk ({size / n / 2**20:.2f} MiB per image)")


def verify_cache(params_path: Path, cache_path: Path = CACHE_PATH) -> list[str]:
    params = load_params(params_path)
    fingerprint, specs, _ = expected_cache(params, cache_path)
    return verify(cache_path, fingerprint, specs)
