"""Reading and writing teacher weights safely.

Checkpoints come from the internet (OpenAI's released ``256x256_diffusion_uncond.pt``) or
from our own pretraining, so loading must never execute code: ``.pt``/``.pth`` go through
``torch.load(weights_only=True)`` only, and our own output is ``.safetensors``. Every problem
is one `TextDiffError` line naming the file.

Layout on disk for what we write: ``<stem>.safetensors`` with guided-diffusion's key names
(so the file also loads into upstream code) and the config JSON in its metadata, plus a
sidecar ``<stem>.json`` holding ``{"config": {...}, ...extra}`` that `load_teacher` reads
when no config is given. Both are written atomically (temp file + os.replace) so an
interrupted run never leaves a truncated checkpoint that a later stage would trust.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from textdiff.atomic import atomic_file
from textdiff.errors import TextDiffError
from textdiff.hashing import sha256_file  # noqa: F401 - re-exported: the teacher's identity
from textdiff.teacher.adm import build_adm, normalize_config

TORCH_SUFFIXES = (".pt", ".pth")
SAFETENSORS_SUFFIX = ".safetensors"
_WRAPPER_KEYS = ("ema", "state_dict", "model")  # EMA weights first: they are what one samples with.
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _short(err: BaseException) -> str:
    """First line of an exception, trimmed: torch's unpickling errors run to a page."""
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else ""
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _torch_load_reason(err: BaseException) -> str:
    """The useful part of torch.load's weights-only refusal (which also suggests weights_only=False,
    exactly what must not be done with an untrusted file)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    marker = "WeightsUnpickler error:"
    if marker in text:
        reason = " ".join(text.split(marker, 1)[1].split("Check the documentation", 1)[0].split())
        reason = reason.split(" Please use", 1)[0].strip()
        if reason:
            return reason if len(reason) <= 160 else reason[:157] + "..."
    return _short(err)


def _is_tensor_mapping(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()
    )


def sidecar_path(path: str | Path) -> Path:
    """``models/x.safetensors`` -> ``models/x.json``."""
    path = Path(path)
    return path.with_suffix(".json")


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A float32 state dict from ``.pt``/``.pth`` (weights-only unpickling) or ``.safetensors``.

    Unwraps ``{"ema"|"state_dict"|"model": {...}}`` training checkpoints and strips the
    ``module.`` prefix DataParallel/DDP adds. Floating tensors stored in half precision are cast
    back to float32 (the teacher runs in float32; reduced precision is autocast's job).
    """
    path = Path(path)
    if not path.is_file():
        raise TextDiffError(f"{path}: checkpoint file not found")
    suffix = path.suffix.lower()
    if suffix in TORCH_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - anything here is a bad file, not a bug
            raise TextDiffError(
                f"{path}: not a loadable weights-only PyTorch checkpoint ({_torch_load_reason(err)})"
            ) from None
    elif suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path), device="cpu")
        except Exception as err:  # noqa: BLE001
            raise TextDiffError(f"{path}: not a readable safetensors file ({_short(err)})") from None
    else:
        raise TextDiffError(
            f"{path}: unsupported checkpoint suffix '{path.suffix}' (use .pt, .pth or .safetensors)"
        )

    if not _is_tensor_mapping(obj) and isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if _is_tensor_mapping(obj.get(key)):
                obj = obj[key]
                break
    if not _is_tensor_mapping(obj):
        if isinstance(obj, Mapping):
            bad = next((k for k, v in obj.items() if not (isinstance(k, str) and torch.is_tensor(v))), None)
            what = "an empty mapping" if not obj else f"a mapping whose entry {bad!r} is not a tensor"
        else:
            what = type(obj).__name__
        raise TextDiffError(f"{path}: expected a mapping of parameter names to tensors, got {what}")

    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        name = key[len("module."):] if key.startswith("module.") else key
        state[name] = value.float() if value.is_floating_point() and value.dtype != torch.float32 else value
    return state


def read_sidecar_config(path: str | Path) -> dict[str, Any] | None:
    """The architecture in the `<stem>.json` beside a checkpoint we exported, or None."""
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        data = json.loads(side.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TextDiffError(f"{side}: not valid JSON ({_short(err)})") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise TextDiffError(f"{side}: expected an object with a 'config' mapping")
    return data["config"]


def _safetensors_config(path: Path) -> dict[str, Any] | None:
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta["config"]) if "config" in meta else None
    except Exception:  # noqa: BLE001 - load_checkpoint will report the real problem
        return None


def _normalized_or_none(config: Mapping[str, Any]) -> dict[str, Any] | None:
    try:
        return normalize_config(config)
    except TextDiffError:
        return None  # build_adm below reports what is wrong with it, naming the sidecar


def teacher_config(path: str | Path, config: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """The architecture of the checkpoint at `path`, and where it came from.

    An explicit `config` wins. Otherwise the sidecar ``<path minus suffix>.json``
    (``{"config": {...}}``), else the safetensors metadata `save_checkpoint` writes; when both
    exist they must agree (a replaced file with a stale sidecar would load strictly and compute
    something else).
    """
    path = Path(path)
    if config is not None:
        return dict(config), "config"
    config = read_sidecar_config(path)
    source = str(sidecar_path(path))
    embedded = _safetensors_config(path)
    if config is None:
        config, source = embedded, f"{path} metadata"
    elif embedded is not None and _normalized_or_none(embedded) not in (None, _normalized_or_none(config)):
        raise TextDiffError(
            f"{sidecar_path(path)}: its config differs from the one stored in {path.name} "
            "(the two files do not belong together); re-export or pass teacher.config"
        )
    if config is None:
        raise TextDiffError(
            f"{path}: no teacher config given and no sidecar {sidecar_path(path)} with a 'config' found"
        )
    return dict(config), source


def load_teacher(path: str | Path, config: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """Build the ADM UNet for `config` (see `teacher_config`) and load `path` into it strictly;
    frozen, eval mode.

    A key or shape mismatch is one line: counts of missing / unexpected / shape-mismatched
    keys and the first three of each.
    """
    path = Path(path)
    config, source = teacher_config(path, config)
    try:
        model = build_adm(config)
    except TextDiffError as err:
        raise TextDiffError(f"{source}: {err}") from None
    state = load_checkpoint(path)

    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {list(state[k].shape)} vs {list(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:

        def first(items: list[str]) -> str:
            return f" ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})" if items else ""

        raise TextDiffError(
            f"{path}: weights do not match the teacher config: {len(missing)} missing{first(missing)}, "
            f"{len(unexpected)} unexpected{first(unexpected)}, "
            f"{len(mismatched)} shape-mismatched{first(mismatched)} (checkpoint vs model)"
        )
    model.load_state_dict(state, strict=True)
    model.eval()
    model.requires_grad_(False)
    return model


def save_checkpoint(model: torch.nn.Module, path: str | Path, extra_metadata: Mapping[str, Any] | None = None,
                    dtype: torch.dtype | str | None = None) -> Path:
    """Write ``<stem>.safetensors`` (+ sidecar ``<stem>.json``) for a model built by build_adm.

    `dtype` (torch.float16 / torch.bfloat16 or their names) casts floating tensors to halve
    the file; loading casts back to float32. `extra_metadata` (JSON-serializable) goes into
    the sidecar next to the config and, as a JSON string under "extra", into the file header.
    Returns the safetensors path.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        raise TextDiffError(f"{path}: checkpoints are written as .safetensors; got suffix '{path.suffix}'")
    config = getattr(model, "config", None)
    if not isinstance(config, dict):
        raise TextDiffError(f"{path}: the model has no .config (build it with build_adm)")
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise TextDiffError(f"{path}: dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        dtype = _DTYPES[dtype]
    if dtype is not None and dtype not in _DTYPES.values():
        raise TextDiffError(f"{path}: dtype must be float32, float16 or bfloat16, got {dtype}")
    extra = dict(extra_metadata or {})
    if "config" in extra:
        raise TextDiffError(f"{path}: extra_metadata must not contain 'config' (it is written from model.config)")
    try:
        extra_json = json.dumps(extra, sort_keys=True)
    except TypeError as err:
        raise TextDiffError(f"{path}: extra_metadata is not JSON-serializable ({err})") from None

    tensors: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        value = value.detach().to("cpu")
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[key] = value.contiguous().clone()
    metadata = {"format": "pt", "config": json.dumps(config, sort_keys=True), "extra": extra_json}

    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    with atomic_file(sidecar_path(path)) as tmp:
        tmp.write_text(json.dumps({"config": config, **extra}, indent=2, sort_keys=False) + "\n")
    return path
