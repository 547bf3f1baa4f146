"""Resumable training: a checkpoint after every validation round, continued exactly after a kill.

`dvc repro` deletes a stage's outputs before it runs, so the checkpoint lives beside the model
folder, not in it (`models/classifier.resume.pt` for `models/classifier`), where DVC never looks.
It holds everything the remaining rounds depend on (weights, optimizer, lr schedule, the random
states of python, numpy and torch, the best-so-far weights and scores, the rounds' records for
dvclive) under an identity: the train (and baseline) params, the cache's spec, the number of
processes, the device kind and the package's source. A checkpoint of any other identity is not
used (one line says why), so a resumed run trains exactly what an uninterrupted one trains; the
batch stream is replayed from its seed to the step reached, which costs random draws only.
The stage deletes the file once the model and its metrics are written.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import textdiff
from textdiff.atomic import atomic_file
from textdiff.errors import TextDiffError

# The train keys that say where training runs, not what it trains (the device kind and the
# number of processes enter the identity on their own).
_NOT_TRAINING = ("device", "nproc")


def resume_path(out_dir: Path) -> Path:
    """Where the train stage's checkpoint for the model folder `out_dir` lives: beside it."""
    out_dir = Path(out_dir)
    return out_dir.parent / f"{out_dir.name}.resume.pt"


def source_sha256() -> str:
    """The package's Python source, hashed: a checkpoint from other code is not continued."""
    root = Path(textdiff.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def training_identity(train: dict, baseline: dict, spec: dict, world: int, device: str) -> str:
    """What makes two train runs the same run, as one JSON string."""
    return json.dumps({
        "train": {k: v for k, v in train.items() if k not in _NOT_TRAINING},
        "baseline": baseline if baseline.get("kind", "none") != "none" else {"kind": "none"},
        "cache": spec, "processes": world, "device": device, "code": source_sha256(),
    }, sort_keys=True, default=str)


def _identity_difference(saved: str, current: str) -> str:
    """Which part of the identity changed, in words."""
    try:
        old, new = json.loads(saved), json.loads(current)
    except (TypeError, ValueError):
        return "it is of another format"
    words = {"train": "the train params", "baseline": "the baseline params", "cache": "the feature cache",
             "processes": "the number of processes", "device": "the device kind", "code": "the code"}
    changed = [words.get(k, k) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if "train" in [k for k in old if old.get(k) != new.get(k)]:
        keys = sorted(k for k in set(old["train"]) | set(new["train"]) if old["train"].get(k) != new["train"].get(k))
        changed[changed.index(words["train"])] = "train." + ", train.".join(keys)
    return "it was made with other " + " and ".join(changed) if changed else "it differs"


def random_states() -> dict[str, Any]:
    """Every global random stream training may draw from."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # Plain lists and numbers (no numpy arrays), so the checkpoint loads with weights_only=True.
    states: dict[str, Any] = {"python": random.getstate(),
                              "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos),
                                        int(has_gauss), float(gauss)],
                              "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states: dict[str, Any]) -> None:
    random.setstate(_as_python_state(states["python"]))
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _as_python_state(state: Any) -> tuple:
    """random.getstate() is (version, tuple of ints, gauss); a pickle round trip may give lists."""
    version, internal, gauss = state
    return version, tuple(internal), gauss


@dataclass
class Checkpoint:
    """The training checkpoint at `path` for one run's `identity`. Only the writer (rank 0 under
    torchrun) saves and removes it; every rank loads it, so all resume at the same step."""

    path: Path
    identity: str
    writer: bool = True

    def load(self) -> dict | None:
        """The saved state when it belongs to this run, else None (having said why once)."""
        if not self.path.is_file():
            return None
        try:
            blob = torch.load(self.path, map_location="cpu", weights_only=True)
            saved = blob["identity"]
        except Exception as err:  # noqa: BLE001 - a torn or foreign file: start over, say so
            if self.writer:
                print(f"train: {self.path} is not a readable checkpoint ({type(err).__name__}); starting from step 0")
            return None
        if saved != self.identity:
            if self.writer:
                print(f"train: not resuming from {self.path}: {_identity_difference(saved, self.identity)}; "
                      "starting from step 0")
            return None
        return blob

    def save(self, blob: dict) -> None:
        if not self.writer:
            return
        try:
            with atomic_file(self.path) as tmp:
                torch.save({"identity": self.identity, **blob}, tmp)
        except OSError as err:
            raise TextDiffError(f"{self.path}: cannot write the training checkpoint ({err.strerror or err})") from None

    def remove(self) -> None:
        if self.writer:
            self.path.unlink(missing_ok=True)


def records_to_json(records: list) -> list[dict]:
    return [asdict(r) for r in records]
