"""Reading and writing teacher weights safely.

Checkpoints come from the internet (OpenAI's released ``256x256_diffusion_uncond.pt``) or
from our own pretraining, so loading must never execute code: ``.pt``/``.pth`` go through
``torch.load(weights_only=True)`` only, and our own output is ``.safetensors``. Every problem
is one `TextDiffError` line naming the file.

Layout on disk for what we write: ``<stem>.safetensors`` with guided-diffusion's key names
(so the file also loads into upstream code) and the config JSON in its metadata, plus a
sidecar ``<stem>.json`` holding ``{"config": {...}, ...extra}`` that `load_teacher` reads
when no config is given. A checkpoint larger than a size limit is written in Hugging Face's
sharded convention instead: ``<stem>-00001-of-0000N.safetensors`` (each with the config in its
header) + ``<stem>.safetensors.index.json`` (``{"metadata": {"total_size"}, "weight_map":
{key: shard}}``), which every loader here accepts in place of a single file. Both are written
atomically (temp file + os.replace) so an interrupted run never leaves a truncated checkpoint that
a later stage would trust.
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from textdiff.atomic import atomic_file
from textdiff.errors import TextDiffError
from textdiff.hashing import sha256_file
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


def torch_load_reason(err: BaseException) -> str:
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


INDEX_SUFFIX = ".safetensors.index.json"


def is_index(path: str | Path) -> bool:
    """A sharded checkpoint's index (``<stem>.safetensors.index.json``)."""
    return Path(path).name.lower().endswith(INDEX_SUFFIX)


def checkpoint_stem(path: str | Path) -> Path:
    """``models/x.safetensors`` and ``models/x.safetensors.index.json`` -> ``models/x``."""
    path = Path(path)
    return path.parent / path.name[: -len(INDEX_SUFFIX)] if is_index(path) else path.with_suffix("")


def sidecar_path(path: str | Path) -> Path:
    """``models/x.safetensors`` (or its sharded index) -> ``models/x.json``."""
    stem = checkpoint_stem(path)
    return stem.parent / (stem.name + ".json")


def shard_name(stem: str, k: int, n: int) -> str:
    return f"{stem}-{k:05d}-of-{n:05d}{SAFETENSORS_SUFFIX}"


def read_index(path: str | Path) -> dict[str, str]:
    """The weight_map of a sharded checkpoint's index: parameter name -> shard file name."""
    path = Path(path)
    if not path.is_file():
        raise TextDiffError(f"{path}: checkpoint index not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TextDiffError(f"{path}: not a valid checkpoint index ({_short(err)})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) and "/" not in v and "\\" not in v
            for k, v in weight_map.items()):
        raise TextDiffError(f"{path}: expected a 'weight_map' of parameter names to shard files in this folder")
    return weight_map


def shard_paths(index: str | Path) -> list[Path]:
    """The shard files an index names, in order; a missing one is an error naming it."""
    index = Path(index)
    shards = [index.parent / name for name in sorted(set(read_index(index).values()))]
    for shard in shards:
        if not shard.is_file():
            raise TextDiffError(f"{shard}: shard of {index.name} not found")
    return shards


def index_path(stem: Path) -> Path:
    """``models/x`` -> ``models/x.safetensors.index.json``."""
    return stem.parent / f"{stem.name}{INDEX_SUFFIX}"


def layout_files(stem: Path) -> list[Path]:
    """Every weights file a checkpoint of this stem may have on disk, in either layout: the single
    file, the index and any shards (whatever their count). The sidecar is not among them."""
    shards = sorted(stem.parent.glob(
        f"{stem.name}-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]{SAFETENSORS_SUFFIX}"))
    return [stem.parent / f"{stem.name}{SAFETENSORS_SUFFIX}", index_path(stem), *shards]


def existing_checkpoint(path: str | Path) -> Path:
    """Where a checkpoint written to `path` (``<stem>.safetensors``) is to be loaded from: its
    sharded index if that is what exists, else the file itself."""
    path = Path(path)
    index = index_path(checkpoint_stem(path))
    return index if not path.is_file() and index.is_file() else path


def checkpoint_sha256(path: str | Path) -> str:
    """The identity of a checkpoint: its file's sha256, or for a sharded one the sha256 of the
    index's bytes and every shard's hash (so any changed shard changes it)."""
    path = Path(path)
    if not is_index(path):
        return sha256_file(path)
    digest = hashlib.sha256(path.read_bytes())
    for shard in shard_paths(path):
        digest.update(f"{shard.name}:{sha256_file(shard)}".encode())
    return digest.hexdigest()


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # noqa: BLE001
        raise TextDiffError(f"{path}: not a readable safetensors file ({_short(err)})") from None


def _load_sharded(index: Path) -> dict[str, torch.Tensor]:
    weight_map = read_index(index)
    state: dict[str, torch.Tensor] = {}
    for shard in shard_paths(index):
        tensors = _load_safetensors(shard)
        wanted = [k for k, v in weight_map.items() if v == shard.name]
        missing = [k for k in wanted if k not in tensors]
        if missing:
            raise TextDiffError(f"{shard}: lacks {len(missing)} tensors that {index.name} puts there ({missing[0]}, "
                                "...)")
        state.update({k: tensors[k] for k in wanted})
    return state


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A float32 state dict from ``.pt``/``.pth`` (weights-only unpickling) or ``.safetensors``.

    Unwraps ``{"ema"|"state_dict"|"model": {...}}`` training checkpoints and strips the
    ``module.`` prefix DataParallel/DDP adds. Floating tensors stored in half precision are cast
    back to float32 (the teacher runs in float32; reduced precision is autocast's job).
    """
    path = Path(path)
    if is_index(path):
        obj = _load_sharded(path)
    elif not path.is_file():
        raise TextDiffError(f"{path}: checkpoint file not found")
    elif path.suffix.lower() in TORCH_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - anything here is a bad file, not a bug
            raise TextDiffError(
                f"{path}: not a loadable weights-only PyTorch checkpoint ({torch_load_reason(err)})"
            ) from None
    elif path.suffix.lower() == SAFETENSORS_SUFFIX:
        obj = _load_safetensors(path)
    else:
        raise TextDiffError(
            f"{path}: unsupported checkpoint suffix '{path.suffix}' (use .pt, .pth, .safetensors "
            f"or a sharded {INDEX_SUFFIX})"
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
    if is_index(path):
        try:
            path = shard_paths(path)[0]
        except TextDiffError:
            return None  # load_checkpoint will report the real problem
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta["config"]) if "config" in meta else None
    except Exception:  # noqa: BLE001 - load_checkpoint will report the real problem
        return None


def unreadable_reason(path: str | Path) -> str | None:
    """Why the file at `path` cannot be a checkpoint at all, from cheap checks (size, safetensors
    header, torch's zip or pickle framing), without loading it; None when it may be one. Lets a
    missing-architecture message not hide a file that is simply broken."""
    path = Path(path)
    if is_index(path) or not path.is_file():
        return None  # an index's shards, and a missing file, are reported where they are loaded
    if path.stat().st_size == 0:
        return "the file is empty (0 bytes)"
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt"):
                return None
        except Exception as err:  # noqa: BLE001
            return f"not a readable safetensors file ({_short(err)})"
    if path.suffix.lower() in TORCH_SUFFIXES:
        with open(path, "rb") as f:
            head = f.read(1)
        if not zipfile.is_zipfile(path) and head != b"\x80":  # torch.save: zip, or a legacy pickle
            return "not a PyTorch checkpoint (neither torch.save's zip nor a pickle)"
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


def _shard_groups(tensors: dict[str, torch.Tensor], payload_limit: int) -> list[list[str]]:
    """Keys in state-dict order, cut greedily into groups of at most `payload_limit` bytes
    (tensors are never split, as in Hugging Face's convention)."""
    groups: list[list[str]] = [[]]
    size = 0
    for key, value in tensors.items():
        nbytes = value.numel() * value.element_size()
        if nbytes > payload_limit:
            raise TextDiffError(f"{key}: {nbytes / 2**20:.2f} MiB, more than a shard may hold "
                                f"({payload_limit / 2**20:.2f} MiB after its header); raise the shard size")
        if groups[-1] and size + nbytes > payload_limit:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    return groups


def _remove_other_layouts(stem: Path, keep: set[Path]) -> None:
    """A re-export must not leave the other layout's files (or extra shards of an older export)
    beside it: a loader that finds them would load something else."""
    for path in layout_files(stem):
        if path not in keep:
            path.unlink(missing_ok=True)


def save_checkpoint(model: torch.nn.Module, path: str | Path, extra_metadata: Mapping[str, Any] | None = None,
                    dtype: torch.dtype | str | None = None, shard_mb: float | None = None) -> Path:
    """Write ``<stem>.safetensors`` (+ sidecar ``<stem>.json``) for a model built by build_adm.

    `dtype` (torch.float16 / torch.bfloat16 or their names) casts floating tensors to halve
    the file; loading casts back to float32. `extra_metadata` (JSON-serializable) goes into
    the sidecar next to the config and, as a JSON string under "extra", into the file header.
    With `shard_mb`, a checkpoint whose file would exceed that many MiB is written as shards of at
    most that size plus ``<stem>.safetensors.index.json``. Returns the path to load: the file, or
    the index.
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
    stem = checkpoint_stem(path)
    limit = None if shard_mb is None else int(shard_mb * 2**20)
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    header_room = 1 << 16  # what a header (names, shapes, offsets, the metadata) needs, at most

    if limit is None or total + header_room <= limit:
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        written, keep = path, {path}
    else:
        if limit <= header_room:
            raise TextDiffError(f"{path}: shard size {shard_mb} MiB is too small for a safetensors header")
        groups = _shard_groups(tensors, limit - header_room)
        names = [shard_name(stem.name, k + 1, len(groups)) for k in range(len(groups))]
        # The index is what binds shards into a checkpoint: an older one goes before any shard is
        # replaced, so an export that dies half-way leaves no index to load a mix of old and new.
        index_path(stem).unlink(missing_ok=True)
        for name, keys in zip(names, groups):
            with atomic_file(stem.parent / name) as tmp:
                save_file({k: tensors[k] for k in keys}, str(tmp), metadata=metadata)
        index = {"metadata": {"total_size": total, "format": "pt"},
                 "weight_map": {k: name for name, keys in zip(names, groups) for k in keys}}
        written = index_path(stem)
        with atomic_file(written) as tmp:
            tmp.write_text(json.dumps(index, indent=2) + "\n")
        keep = {written, *(stem.parent / n for n in names)}
    _remove_other_layouts(stem, keep)
    with atomic_file(sidecar_path(path)) as tmp:
        tmp.write_text(json.dumps({"config": config, **extra}, indent=2, sort_keys=False) + "\n")
    return written
