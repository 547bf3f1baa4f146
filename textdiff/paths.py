"""Where the pipeline's artefacts live, relative to the repository root.

dvc.yaml names these paths too; keeping them in one module means a stage, `textdiff predict` and
the tests can never disagree about where the cache or the trained classifier is.
"""

from __future__ import annotations

from pathlib import Path

PREPARED_DIR = Path("data/prepared")
CACHE_PATH = Path("cache/features.zarr")
CLASSIFIER_DIR = Path("models/classifier")
METRICS_DIR = Path("metrics")
PANEL_DIR = METRICS_DIR / "panels"
SUMMARY_CSV = METRICS_DIR / "summary.csv"
PREDICTIONS_H5 = METRICS_DIR / "predictions.h5"
INSTANCES_H5 = METRICS_DIR / "instances.h5"  # the separated nuclei of every test image
EVALUATE_LOCK = METRICS_DIR / ".evaluate.lock"  # one evaluate at a time writes the above (textdiff.locks)
TRAIN_LIVE_DIR = Path("dvclive/train")
PRETRAIN_LIVE_DIR = Path("dvclive/pretrain")
TEACHER_FILE = "teacher.safetensors"  # the pretrain stage's export, inside `pretrain.out`


def resolve_data_root(root: str, cwd: Path | None = None) -> Path:
    """`data.root` as a path: absolute as given; relative to the repo root otherwise.

    A queued `dvc exp run` executes in a temporary copy under `<repo>/.dvc/tmp/exps/...`, where
    the default `../shared/data/MoNuSeg` would point inside `.dvc/`; there the path is taken
    relative to the repository that queued the experiment instead.
    """
    path = Path(root).expanduser()
    if path.is_absolute():
        return path
    cwd = (cwd or Path.cwd()).resolve()
    candidates = [cwd / path]
    parts = cwd.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            candidates.append(Path(*parts[:i]) / path)
            break
    return next((c for c in candidates if c.exists()), candidates[0])
