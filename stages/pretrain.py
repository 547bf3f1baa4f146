"""Stage `pretrain`: the in-domain teacher, unless the user brought one.

Reads only data/prepared/{train,val}.npz: test images never reach the teacher. Resumable (see
`textdiff.pretrain.loop`).
"""

from __future__ import annotations

from pathlib import Path

from textdiff.locks import hold, lock_path
from textdiff.params import load_params
from textdiff.paths import PREPARED_DIR
from textdiff.pretrain.loop import run_pretraining
from textdiff.teacher.adm import config_problem


def run(params_path: Path, prepared_dir: Path = PREPARED_DIR) -> None:
    params = load_params(params_path)
    params.refuse(config_problem("pretrain.config", params.pretrain.config))
    out = Path(params.pretrain.out)
    with hold(lock_path(out), f"the teacher's training folder {out}"):
        print(run_pretraining(params, params_path, prepared_dir))
