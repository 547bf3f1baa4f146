"""Shared fixtures: where the real data lives, and small synthetic datasets to break on purpose."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]

# The LViT layout (kept here rather than imported, so the fixtures describe the format independently).
FOLDERS = {"train": "Train_Folder", "val": "Val_Folder", "test": "Test_Folder"}
WORKBOOKS = {"train": "Train_text.xlsx", "val": "Val_text.xlsx", "test": "Test_text.xlsx"}
INSTANCE_FOLDERS = {"train": "Train", "val": "Val", "test": "Test"}  # the MoNuSeg-instances layout
REPORTS = (
    "The nuclei are evenly distributed.",
    "The nuclei density in the upper right is high.",
    "The nuclei are sparsely distributed.",
    "The nuclei density in the lower left is high.",
)


def random_adm(config: dict, std: float, seed: int = 0):
    """An ADM UNet with N(0, std) weights: guided-diffusion zero-initialises output layers, so a
    freshly built model would hide wiring mistakes behind zeros."""
    import torch

    from textdiff.teacher import build_adm

    torch.manual_seed(seed)
    model = build_adm(config)
    for p in model.parameters():
        p.data.normal_(0, std)
    return model.eval()


@pytest.fixture(scope="session")
def shared_root() -> Path:
    """The read-only `../shared` folder next to the repository root (may not exist)."""
    return REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def monuseg_root(shared_root: Path) -> Path:
    """The real MoNuSeg data in the LViT layout; skips the test when it is not available."""
    root = shared_root / "data" / "MoNuSeg"
    if not (root / "Train_Folder").is_dir():
        pytest.skip(f"real MoNuSeg data not found at {root}")
    return root


def write_workbook(path: Path, rows: Iterable[Iterable], header: Iterable | None = ("Image", "Description")) -> Path:
    """Write an .xlsx with one sheet: `header` (None = no header row) then `rows`."""
    import openpyxl

    wb = openpyxl.Workbook()
    ws = wb.active
    ws.title = "Sheet1"
    if header is not None:
        ws.append(list(header))
    for row in rows:
        ws.append(list(row))
    path.parent.mkdir(parents=True, exist_ok=True)
    wb.save(path)
    return path


@pytest.fixture
def xlsx_writer() -> Callable[..., Path]:
    """`write_workbook(path, rows, header=("Image", "Description"))` for tests that rewrite reports."""
    return write_workbook


def _synthetic_pair(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A pinkish H&E-like RGB image and a 0/255 mask of a few discs (both classes present)."""
    image, mask, _ = _synthetic_triple(rng, size)
    return image, mask


def _synthetic_triple(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_synthetic_pair` and its per-nucleus uint16 labels (one id per disc; a later disc covers an
    earlier one where they overlap; the centre pixel its own nucleus when no disc holds it)."""
    yy, xx = np.mgrid[:size, :size]
    mask = np.zeros((size, size), bool)
    labels = np.zeros((size, size), np.uint16)
    for k in range(3):
        cy, cx = rng.integers(4, size - 4, 2)
        r = rng.integers(3, max(4, size // 6))
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        mask |= disc
        labels[disc] = k + 1
    mask[0, 0] = False  # never all foreground
    labels[0, 0] = 0
    if not mask[size // 2, size // 2]:
        labels[size // 2, size // 2] = 4
    mask[size // 2, size // 2] = True  # never all background
    image = np.empty((size, size, 3), np.uint8)
    noise = rng.integers(0, 30, (size, size, 3))
    image[:] = np.where(mask[..., None], [90, 40, 140], [230, 170, 200]) + noise - 15
    return image, mask.astype(np.uint8) * 255, labels


@pytest.fixture
def tiny_monuseg(tmp_path: Path) -> Callable[..., Path]:
    """Factory for a small synthetic dataset in the LViT layout; returns its root.

    `tiny_monuseg(name="MoNuSeg", counts={"train": 3, "val": 2, "test": 2}, size=40, seed=0)`
    writes `<tmp_path>/<name>/{Train,Val,Test}_Folder/` with img/ (.png; .tif for test, like the
    real data), labelcol/ (0/255 .png) and `<Split>_text.xlsx` (`Image` = mask file name,
    `Description`), and beside it `<name>-instances/{Train,Val,Test}/<id>.png` (uint16 per-nucleus
    labels, the data.instances layout). Ids are `img_<split>_<k>`. Tests then break single files on
    purpose.
    """

    def make(name: str = "MoNuSeg", counts: dict[str, int] | None = None, size: int = 40, seed: int = 0) -> Path:
        counts = {"train": 3, "val": 2, "test": 2} if counts is None else counts
        rng = np.random.default_rng(seed)
        root = tmp_path / name
        for split, n in counts.items():
            folder = root / FOLDERS[split]
            (folder / "img").mkdir(parents=True, exist_ok=True)
            (folder / "labelcol").mkdir(parents=True, exist_ok=True)
            rows = []
            for k in range(n):
                stem = f"img_{split}_{k}"
                image, mask, labels = _synthetic_triple(rng, size)
                suffix = ".tif" if split == "test" else ".png"
                Image.fromarray(image, "RGB").save(folder / "img" / f"{stem}{suffix}")
                Image.fromarray(mask, "L").save(folder / "labelcol" / f"{stem}.png")
                instances = tmp_path / f"{name}-instances" / INSTANCE_FOLDERS[split]
                instances.mkdir(parents=True, exist_ok=True)
                Image.fromarray(labels).save(instances / f"{stem}.png")
                rows.append((f"{stem}.png", REPORTS[k % len(REPORTS)]))
            write_workbook(folder / WORKBOOKS[split], rows)
        return root

    return make


# ---------------------------------------------------------------- a tiny pipeline workspace

TINY_TEACHER = {
    "image_size": 32,
    "num_channels": 32,
    "num_res_blocks": 1,
    "channel_mult": "1,2",
    "attention_resolutions": "16",
    "num_head_channels": 16,
    "learn_sigma": True,
    "use_scale_shift_norm": True,
    "resblock_updown": True,
}


def _deep_update(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _deep_update(out.get(key, {}), value) if isinstance(value, dict) and key != "config" else value
    return out


class TinyProject:
    """A working directory laid out like the repo: params.yaml, data/prepared, a teacher file."""

    def __init__(self, root: Path, data_root: Path, teacher: Path):
        self.root, self.data_root, self.teacher = root, data_root, teacher
        self.params_path = root / "params.yaml"
        self.base = {
            # Raw colours: the pipeline-mechanics tests compare against the prepared pixels; the stain
            # tests switch data.stain on themselves (macenko, the default, included).
            "data": {"root": str(data_root), "instances": f"{data_root}-instances", "image_size": 32, "stain": "none"},
            "teacher": {"checkpoint": str(teacher), "steps": [10, 100], "blocks": [0, 3]},
            "text": {"max_length": 8},
            "extract": {"views": 1, "eval_views": 1, "batch_size": 2},
            "train": {"epochs": 2, "d_model": 16, "heads": 2},
            "evaluate": {"panels": 2},
        }

    def write_params(self, **overrides) -> Path:
        import yaml

        self.params_path.write_text(yaml.safe_dump(_deep_update(self.base, overrides), sort_keys=False))
        return self.params_path


@pytest.fixture
def tiny_project(tiny_monuseg, tmp_path: Path, monkeypatch) -> TinyProject:
    """tiny_monuseg + a randomly initialised tiny ADM teacher + params.yaml, prepared, cwd = it."""
    import torch

    from stages import prepare
    from textdiff.teacher import build_adm, save_checkpoint

    data_root = tiny_monuseg(counts={"train": 3, "val": 2, "test": 2}, size=40)
    work = tmp_path / "work"
    work.mkdir()
    torch.manual_seed(0)
    teacher = save_checkpoint(build_adm(TINY_TEACHER), work / "models" / "tiny_teacher.safetensors")
    monkeypatch.chdir(work)
    project = TinyProject(work, data_root, teacher)
    project.write_params()
    prepare.run(project.params_path)
    return project


@pytest.fixture
def trained(tiny_project) -> TinyProject:
    """tiny_project with its cache extracted and a small classifier trained on it (1 epoch)."""
    from typer.testing import CliRunner

    from stages.cli import app

    runner = CliRunner()
    assert runner.invoke(app, ["extract"]).exit_code == 0
    tiny_project.write_params(train={"epochs": 1, "d_model": 16, "heads": 2})
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 0, result.output
    return tiny_project


# ---------------------------------------------------------------- the repo as a DVC project

def checkout_project(work: Path, sections: dict[str, dict]) -> tuple[Path, dict]:
    """The repo's tracked files (no metrics, dvclive or dvc.lock) in a fresh git repo at `work`,
    with params.yaml's sections updated by `sections`; returns (work, the env to run dvc in)."""
    import os
    import shutil
    import subprocess

    import yaml

    if shutil.which("textdiff") is None or shutil.which("dvc") is None:
        pytest.fail("`textdiff` and `dvc` must be on PATH: pip install -e '.[dev]' (README Quick start)")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    for name in filter(None, files.stdout.split("\0")):
        src = REPO_ROOT / name
        if src.is_file() and not name.startswith(("metrics/", "dvclive/")) and name != "dvc.lock":
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, work / name)
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, GIT_AUTHOR_NAME="ci", GIT_AUTHOR_EMAIL="ci@example.com", GIT_COMMITTER_NAME="ci",
               GIT_COMMITTER_EMAIL="ci@example.com", DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "project"]):
        subprocess.run(cmd, cwd=work, env=env, check=True, capture_output=True)
    return work, env


def write_slide(path: Path, image: np.ndarray, levels: int = 3, tile: int = 64, mpp: float = 0.25) -> Path:
    """A pyramidal tiled TIFF (OpenSlide's "generic-tiff"): level k is the image at 1/2**k."""
    import tifffile

    with tifffile.TiffWriter(path) as tif:
        for k in range(levels):
            level = np.ascontiguousarray(image[:: 2**k, :: 2**k])
            res = 1e4 / mpp / 2**k
            tif.write(level, tile=(tile, tile), photometric="rgb", compression="zlib", resolution=(res, res),
                      resolutionunit="CENTIMETER", subfiletype=0 if k == 0 else 1)
    return path


# ---------------------------------------------------------------- comparing runs

def kill_tree(process) -> None:
    """SIGKILL a `subprocess.Popen` and every process under it at once, as a scheduler or the OOM
    killer ends a job (torchrun starts its workers in sessions of their own: killing its group alone
    orphans them); no handler runs anywhere."""
    import contextlib
    import os
    import signal

    import psutil

    try:
        tree = [process.pid, *(p.pid for p in psutil.Process(process.pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        tree = []
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()


def cache_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of a feature cache, keyed `<split>/<name>`."""
    import zarr

    root = zarr.open_group(str(path), mode="r")
    return {f"{split}/{name}": np.asarray(array[:]) for split in root.group_keys()
            for name, array in root[split].arrays()}


def predict_outputs(out: Path) -> dict[str, object]:
    """What `textdiff predict` wrote into `out` (hidden records aside): PNGs as arrays, each
    predictions.h5 dataset with its attributes (but the run-specific record id), CSV rows, GeoJSON
    features."""
    import csv
    import json

    import h5py

    found: dict[str, object] = {}
    for path in sorted(out.iterdir()):
        if path.name.startswith("."):
            continue
        if path.suffix == ".png":
            found[path.name] = np.asarray(Image.open(path))
        elif path.suffix == ".h5":
            with h5py.File(path) as h5:
                found[path.name] = {k: (np.asarray(h5[k]), {a: str(v) for a, v in h5[k].attrs.items() if a != "record"})
                                    for k in h5}
        elif path.suffix == ".csv":
            with open(path, newline="") as f:
                found[path.name] = list(csv.DictReader(f))
        elif path.suffix == ".geojson":
            found[path.name] = json.loads(path.read_text())["features"]
    return found


def assert_same_predict_outputs(expected: dict, got: dict, context: object = None) -> None:
    assert got.keys() == expected.keys(), context
    for name, value in expected.items():
        if isinstance(value, np.ndarray):
            assert np.array_equal(value, got[name]), (context, name)
        elif name.endswith(".h5"):
            assert value.keys() == got[name].keys(), (context, name)
            for key, (array, attrs) in value.items():
                assert np.array_equal(array, got[name][key][0]) and attrs == got[name][key][1], (context, name, key)
        else:
            assert value == got[name], (context, name)
