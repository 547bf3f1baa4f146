"""`textdiff report`: the experiments' test metrics as a markdown ablation table, or (`--curves`)
the label-efficiency curves: metrics/label_efficiency.md, .png and one CSV per method for `dvc plots`."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

from textdiff.atomic import atomic_file
from textdiff.errors import TextDiffError
from textdiff.report.ablation import CSV_COLUMNS, csv_rows, markdown_table, rows_from_exp_show
from textdiff.report.curves import aggregate, markdown, plot, runs_from_exp_show, write_csvs

CURVES_MD = Path("metrics/label_efficiency.md")


def exp_show(exp_json: Path | None = None, all_commits: bool = False) -> object:
    """`dvc exp show --json` (run now, or read from a saved file)."""
    if exp_json is not None:
        try:
            text = Path(exp_json).read_text()
        except OSError as err:
            raise TextDiffError(f"{exp_json}: cannot read it ({err.strerror})") from None
        try:
            shown = json.loads(text)
        except json.JSONDecodeError as err:
            raise TextDiffError(f"{exp_json}: not JSON (line {err.lineno}: {err.msg})") from None
        if not isinstance(shown, list) or not all(isinstance(c, dict) and "rev" in c for c in shown):
            raise TextDiffError(f"{exp_json}: not `dvc exp show --json` output (expected a list of commits, "
                                "each with a 'rev')")
        return shown
    try:
        cmd = ["dvc", "exp", "show", "--json"] + (["--all-commits"] if all_commits else [])
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise TextDiffError("dvc is not on PATH (pip install dvc)") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise TextDiffError(f"`dvc exp show --json` failed: {last}")
    return json.loads(done.stdout or "[]")


def run(out: Path = Path("metrics/ablation.md"), exp_json: Path | None = None, all_commits: bool = False) -> str:
    rows = rows_from_exp_show(exp_show(exp_json, all_commits))
    if not rows:
        raise TextDiffError("no experiment with metrics/test.json yet: run `dvc repro` or `dvc exp run` first")
    table = "# Ablation (test split)\n\n" + markdown_table(rows)
    with atomic_file(out) as tmp:
        tmp.write_text(table)
    with atomic_file(out.with_suffix(".csv")) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS))
        writer.writeheader()
        writer.writerows(csv_rows(rows))
    print(table, end="")
    print(f"wrote {out} and {out.with_suffix('.csv')} ({len(rows)} runs)")
    return table


def run_curves(out: Path = CURVES_MD, exp_json: Path | None = None, all_commits: bool = False) -> str:
    """The label-efficiency table, plot and per-method CSVs from the experiments trained by steps."""
    runs = runs_from_exp_show(exp_show(exp_json, all_commits))
    if not any(r["method"] != "classic" for r in runs):
        raise TextDiffError("no experiment trained with train.steps > 0 yet: queue the grid with "
                            "`python benchmarks/label_grid.py --queue` and run `dvc queue start`")
    budgets = sorted({r["steps"] for r in runs if r["method"] != "classic"})
    if len(budgets) > 1:
        raise TextDiffError(f"the experiments were trained with different train.steps budgets {budgets}; "
                            "curves compare one budget (remove the others with `dvc exp remove`)")
    summary = aggregate(runs)
    table = (f"# Label efficiency (train.steps = {budgets[0]}, {len(runs)} runs)\n\n" + markdown(summary))
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:
        tmp.write_text(table)
    with atomic_file(out.with_suffix(".png")) as tmp:
        plot(summary, tmp)
    write_csvs(summary, out.with_suffix(""))
    print(table, end="")
    print(f"wrote {out}, {out.with_suffix('.png')} and {out.with_suffix('')}/<method>.csv")
    return table
