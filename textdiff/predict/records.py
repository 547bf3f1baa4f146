"""Resumable prediction over many images: a per-image record, written last, says an image is done.

`textdiff predict` over a folder of thousands of images must not redo them all after a kill near
the end. Each image's files (mask, instances, picture) are written whole (atomic), then its
probability map and its nucleus rows go into `<out>/.textdiff-predict/<id>.npz` / `<id>.json`,
the JSON last: it names the files and carries the image's identity (the model's file hashes, the
report sentence, the scale settings, the source file's path, size and mtime, the ground truth
used to score it). A later run over the same folder skips an image whose record has the same
identity and whose files are all there; `--overwrite` ignores the records. `predictions.h5` and
`nuclei.csv` are rebuilt from the records at the end of every run, so a kill never leaves them
half-written: once an image's map is in `predictions.h5` (tagged with its record's id), its
`.npz` is deleted and a later run reads the map from there.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from textdiff.atomic import atomic_file, write_json

RECORDS_DIR = ".textdiff-predict"
FORMAT = 1


def file_identity(path: Path | None) -> dict | None:
    """A file as a record remembers it: where, how big, when last changed (not its hash: reading
    every slide again to decide whether to skip it would cost what skipping saves)."""
    if path is None or not Path(path).is_file():
        return None
    stat = os.stat(path)
    return {"path": str(Path(path).resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


@dataclass
class ImageRecord:
    """One finished image: what `nuclei.csv` and the summary need, and where its map is."""

    stem: str
    record_id: str
    rows: list[dict]
    megapixels: float
    scored: bool
    assumed_mpp: bool
    attrs: dict  # the attributes of its dataset in predictions.h5


class PredictRecords:
    """The records of one output folder."""

    def __init__(self, out: Path, overwrite: bool = False):
        self.out = Path(out)
        self.dir = self.out / RECORDS_DIR
        if overwrite:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)

    def _json(self, stem: str) -> Path:
        return self.dir / f"{stem}.json"

    def _npz(self, stem: str) -> Path:
        return self.dir / f"{stem}.npz"

    def finished(self, stem: str, identity: dict, h5: h5py.File | None) -> ImageRecord | None:
        """The record of `stem` when it is done for exactly this `identity`: its files are all there
        and its probability map is in its .npz or (by record id) in the previous predictions.h5."""
        try:
            raw = json.loads(self._json(stem).read_text())
        except (OSError, ValueError):
            return None
        if raw.get("format") != FORMAT or raw.get("identity") != identity:
            return None
        if not all((self.out / name).is_file() for name in raw["outputs"]):
            return None
        in_h5 = h5 is not None and stem in h5 and h5[stem].attrs.get("record") == raw["record_id"]
        if not (in_h5 or self._npz(stem).is_file()):
            return None
        return ImageRecord(stem, raw["record_id"], raw["rows"], raw["megapixels"], raw["scored"],
                           raw["assumed_mpp"], raw["attrs"])

    def save(self, stem: str, identity: dict, outputs: list[str], prob: np.ndarray, rows: list[dict],
             megapixels: float, scored: bool, assumed_mpp: bool, attrs: dict) -> ImageRecord:
        """Record a finished image (its files already written): the map first, the JSON last."""
        self._json(stem).unlink(missing_ok=True)  # an old record never vouches for the new map
        with atomic_file(self._npz(stem)) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, probability=prob)
        record = ImageRecord(stem, uuid.uuid4().hex, rows, megapixels, scored, assumed_mpp, attrs)
        write_json(self._json(stem), {"format": FORMAT, "identity": identity, "record_id": record.record_id,
                                      "outputs": outputs, "rows": rows, "megapixels": megapixels,
                                      "scored": scored, "assumed_mpp": assumed_mpp, "attrs": attrs})
        return record

    def probability(self, record: ImageRecord, h5: h5py.File | None) -> np.ndarray:
        path = self._npz(record.stem)
        if path.is_file():
            with np.load(path) as data:
                return data["probability"]
        return np.asarray(h5[record.stem])  # `finished` checked it is there, under this record's id

    def drop_maps(self, records: list[ImageRecord]) -> None:
        """The maps now held by predictions.h5 need no second copy."""
        for record in records:
            self._npz(record.stem).unlink(missing_ok=True)


def write_predictions(path: Path, records: list[ImageRecord], store: PredictRecords, header: dict,
                      failed: list[str]) -> None:
    """predictions.h5, whole, from the finished images' maps (read from the previous file where
    this run skipped an image), then their .npz copies dropped."""
    previous = h5py.File(path, "r") if path.is_file() else None
    try:
        with atomic_file(path) as tmp, h5py.File(tmp, "w") as h5:
            h5.attrs.update(header)
            for record in records:
                ds = h5.create_dataset(record.stem, data=store.probability(record, previous), compression="gzip")
                ds.attrs.update({**record.attrs, "record": record.record_id})
            # A reader of predictions.h5 alone must see which inputs are missing from it, and why.
            h5.attrs["failed"] = json.dumps(failed)
    finally:
        if previous is not None:
            previous.close()
    store.drop_maps(records)
