"""Stage `pretrain`: the in-domain teacher, unless the user brought one.

Reads only data/prepared/{train,val}.npz: test images never reach the teacher. Resumable (see
`textdiff.pretraining`).
"""

from __future__ import annotations

from pathlib import Path

from textdiff.params import load_params
from textdiff.paths import PREPARED_DIR
from textdiff.pretraining import run_pretraining


def run(params_path: Path, prepared_dir: Path = PREPARED_DIR) -> None:
    print(run_pretraining(load_params(params_path), params_path, prepared_dir))
