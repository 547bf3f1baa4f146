"""`textdiff report`: the experiments' test metrics as a markdown ablation table."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from textdiff.errors import TextDiffError
from textdiff.ablation import markdown_table, rows_from_exp_show

from textdiff.atomic import atomic_file


def run(out: Path = Path("metrics/ablation.md"), exp_json: Path | None = None, all_commits: bool = False) -> str:
    if exp_json is not None:
        try:
            exp_show = json.loads(Path(exp_json).read_text())
        except (OSError, json.JSONDecodeError):
            raise TextDiffError(f"{exp_json}: not readable `dvc exp show --json` output") from None
    else:
        try:
            cmd = ["dvc", "exp", "show", "--json"] + (["--all-commits"] if all_commits else [])
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except FileNotFoundError:
            raise TextDiffError("dvc is not on PATH (pip install dvc)") from None
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise TextDiffError(f"`dvc exp show --json` failed: {last}")
        exp_show = json.loads(done.stdout or "[]")
    rows = rows_from_exp_show(exp_show)
    if not rows:
        raise TextDiffError("no experiment with metrics/test.json yet: run `dvc repro` or `dvc exp run` first")
    table = "# Ablation (test split)\n\n" + markdown_table(rows)
    with atomic_file(out) as tmp:
        tmp.write_text(table)
    print(table, end="")
    return table
