"""Stage one's work: run the teacher once per image, view and timestep into the zarr cache.

The expensive part of TextDiff is the UNet forward pass; the release recomputes it every epoch. Here
it runs exactly once per (image, view, step): an image's arrays are written, then its `complete`
flag, so an interrupted run resumes at the first unflagged image and never recomputes a finished one.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import torch
import zarr
from tqdm import tqdm

from textdiff.cache import SplitSpec, to_storage
from textdiff.views import apply_view


def data_fingerprint(ids: list[str], texts: list[str], images: np.ndarray, masks: np.ndarray) -> str:
    """sha256 of exactly what the teacher and the text encoder will see for one split."""
    h = hashlib.sha256()
    for value in (*ids, "\0", *texts):
        h.update(value.encode() + b"\0")
    h.update(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(masks).tobytes())
    return h.hexdigest()


def images_to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1], the range the DDPM was trained on."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def write_text(group: zarr.Group, tokens: np.ndarray, mask: np.ndarray, pooled: np.ndarray) -> None:
    group["text_tokens"][:] = tokens
    group["text_mask"][:] = mask
    group["text_pooled"][:] = pooled
    group.attrs["text_complete"] = True


def extract_split(
    group: zarr.Group,
    spec: SplitSpec,
    images: np.ndarray,
    masks: np.ndarray,
    extractor,
    batch_size: int,
    device: torch.device,
    desc: str = "",
) -> dict:
    """Fill every unflagged image of one split; returns counts and timing for the summary."""
    todo = np.flatnonzero(group["complete"][:] == 0)
    views = spec.views
    started = time.perf_counter()
    with tqdm(total=len(todo), unit="img", desc=desc, dynamic_ncols=True, disable=len(todo) == 0) as bar:
        for start in range(0, len(todo), batch_size):
            index = todo[start : start + batch_size]
            x = images_to_model_range(images[index])
            m = torch.from_numpy(np.ascontiguousarray(masks[index]))
            x_views = torch.stack([apply_view(x, v) for v in range(views)], dim=1)
            m_views = torch.stack([apply_view(m, v) for v in range(views)], dim=1)
            feats = extractor(x_views.flatten(0, 1).to(device))
            for j, i in enumerate(index):
                for b, f in feats.items():
                    per_image = f.unflatten(0, (len(index), views))[j]
                    group[f"block_{b}"][int(i)] = to_storage(per_image, spec.dtype)
                group["masks"][int(i)] = m_views[j].numpy()
                group["images"][int(i)] = images[i]
                group["complete"][int(i)] = 1  # last: image i now counts
            bar.update(len(index))
    seconds = time.perf_counter() - started
    return {"done": int(len(todo)), "skipped": int(spec.n - len(todo)), "seconds": seconds}
