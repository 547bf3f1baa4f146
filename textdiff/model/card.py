"""A trained model on disk: `models/classifier/{model.json, model.pt}`.

model.json is the model's card: what kind of model it is (`kind`: a TextDiff classifier, or a
baseline scored through the same stages), the `CacheSpec` of the features it was trained on
(teacher, steps, blocks, text encoder, working size, protocol), the train params and the
validation score. evaluate and `textdiff predict` rebuild everything from it. This module is the
one reader of that folder, so a missing, foreign or damaged model gets the same one-line error
whichever command meets it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from textdiff.atomic import atomic_dir
from textdiff.cache.spec import CacheSpec
from textdiff.errors import TextDiffError
from textdiff.model.classifier import ClassifierConfig, PixelClassifier
from textdiff.model.nuclei import NucleusRule
from textdiff.runtime.device import device_name, native_bfloat16
from textdiff.teacher.checkpoint import torch_load_reason

CARD_FILE = "model.json"
WEIGHTS_FILE = "model.pt"
TEXTDIFF = "textdiff"
KINDS = (TEXTDIFF, "classic", "unet", "cellpose")  # what model.json's `kind` may say (absent: textdiff)


@dataclass(frozen=True)
class ModelFiles:
    """A model folder's card, read and checked for its kind; the weights file is not opened yet."""

    kind: str
    raw: dict
    card_path: Path
    weights_path: Path


def read_model_dir(model_dir: Path) -> ModelFiles:
    """model.json of `model_dir`: missing, unreadable, not a mapping or of an unknown kind is one line."""
    card_path = Path(model_dir) / CARD_FILE
    if not card_path.is_file():
        raise TextDiffError(f"{card_path}: trained classifier not found (run `textdiff train`)")
    try:
        raw = json.loads(card_path.read_text())
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise TextDiffError(f"{card_path}: not a classifier description ({type(err).__name__})") from None
    if not isinstance(raw, dict):
        raise TextDiffError(f"{card_path}: not a classifier description (holds a {type(raw).__name__})")
    kind = raw.get("kind", TEXTDIFF)
    if kind not in KINDS:
        raise TextDiffError(f"{card_path}: unknown model kind {kind!r} (known: {', '.join(KINDS)})")
    return ModelFiles(kind, raw, card_path, Path(model_dir) / WEIGHTS_FILE)


def card_problem(files: ModelFiles, err: Exception) -> TextDiffError:
    """The one error for a model.json that has the right kind but not the fields it needs."""
    reason = str(err).removeprefix(f"{files.card_path}: ") if isinstance(err, TextDiffError) else type(err).__name__
    return TextDiffError(f"{files.card_path}: not a classifier description ({reason})")


def load_weights(files: ModelFiles, what: str) -> dict:
    """model.pt as a state dict (weights only: never unpickles code), or one line saying why not."""
    path = files.weights_path
    if not path.is_file():
        raise TextDiffError(f"{path}: {what} weights not found (run `textdiff train`)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling a foreign or damaged file raises many types
        raise TextDiffError(f"{path}: not a loadable weights-only PyTorch file ({torch_load_reason(err)})") from None
    if not isinstance(state, dict):
        raise TextDiffError(f"{path}: holds a {type(state).__name__}, not the {what} state dict")
    return state


def save_model_dir(out_dir: Path, card: dict, state: dict[str, torch.Tensor] | None) -> None:
    """model.pt (when there are weights) + model.json, swapped in together: a half-written model is never left."""
    with atomic_dir(out_dir) as tmp:
        if state is not None:
            torch.save(state, tmp / WEIGHTS_FILE)
        (tmp / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")


@dataclass
class ModelCard:
    """model.json: what a trained classifier is and what it needs at inference."""

    classifier: ClassifierConfig
    spec: CacheSpec
    train: dict  # the train params section
    best_epoch: int
    best_val_dice: float
    best_val_iou: float
    train_ids: list[str]
    cache: str  # the cache it was trained on
    teacher_path: str | None  # where the teacher was at training time (checked by sha256 on use)
    provenance: dict = field(default_factory=dict)
    source_mpp: float = 0.0  # data.mpp of the training images (0: a model from before it was recorded)
    working_mpp: float = 0.0  # µm per pixel the classifier works at (textdiff.data.magnification.working_mpp)
    nuclei: dict = field(default_factory=dict)  # the NucleusRule chosen on val ({}: the default rule)
    val_aji_instance: float = 0.0  # its mean validation AJI (0: not measured)
    nucleus_area_um2: float = 0.0  # median area of the training nuclei (model.depth; 0: not recorded)

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["classifier"] = self.classifier.to_json()
        out["cache_spec"] = out.pop("spec").to_json()
        return out

    @classmethod
    def from_json(cls, raw: dict, source: str) -> ModelCard:
        values = dict(raw)
        spec = values.pop("cache_spec", values.pop("cache_fingerprint", None))  # the key before CacheSpec
        values["spec"] = CacheSpec.from_json(spec, source=source)
        values["classifier"] = ClassifierConfig.from_json(values["classifier"])
        return cls(**values)




def nuclei_rule(files: ModelFiles) -> NucleusRule:
    """How the model's maps become separated nuclei: the rule chosen on val, or the default one for
    a model from before rules were recorded (or trained without per-nucleus ground truth)."""
    raw = files.raw.get("nuclei") or {}
    return NucleusRule.from_json(raw, source=str(files.card_path)) if raw else NucleusRule()


def save_trained(out_dir: Path, state: dict[str, torch.Tensor], card: ModelCard) -> None:
    """A trained TextDiff classifier's folder."""
    save_model_dir(out_dir, card.to_json(), state)


def load_classifier(state: dict, config: ClassifierConfig, device: torch.device) -> PixelClassifier:
    model = PixelClassifier(config)
    model.load_state_dict(state)
    return model.to(device).eval()


def load_trained(model_dir: Path, device: torch.device) -> tuple[PixelClassifier, ModelCard]:
    """The TextDiff classifier in `model_dir` and its card; one-line errors for missing or foreign files."""
    files = read_model_dir(model_dir)
    if files.kind != TEXTDIFF:
        raise TextDiffError(f"{files.card_path}: holds the {files.kind} baseline (baseline.kind={files.kind}), not a "
                            "TextDiff classifier; train one with baseline.kind: none")
    if not files.weights_path.is_file():
        raise TextDiffError(f"{files.weights_path}: trained classifier not found (run `textdiff train`)")
    try:
        card = ModelCard.from_json(files.raw, source=str(files.card_path))
    except (KeyError, TypeError, AttributeError, TextDiffError) as err:
        raise card_problem(files, err) from None
    state = load_weights(files, "classifier's")
    if card.classifier.autocast == "bfloat16" and not native_bfloat16(device):
        # Emulated bfloat16 is ~9x slower at inference than float32: run the float32 weights as they are.
        card = dataclasses.replace(card, classifier=dataclasses.replace(card.classifier, autocast="float32"))
        if os.environ.get("RANK", "0") == "0":
            print(f"note: {files.card_path}: trained under bfloat16 autocast, which {device_name(device)} does not "
                  "compute in hardware; the classifier runs in float32 here (outputs may differ in the last digits)",
                  file=sys.stderr)
    try:
        model = load_classifier(state, card.classifier, device)
    except (RuntimeError, EOFError, ValueError, KeyError, TypeError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise TextDiffError(f"{files.weights_path}: cannot load the classifier weights ({reason})") from None
    return model, card
