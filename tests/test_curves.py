"""Label-efficiency curves: dvc exp show --json -> table, plot, per-method CSVs (`textdiff report --curves`)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stages.cli import app
from textdiff.report.curves import aggregate, markdown, method_of, runs_from_exp_show, write_csvs

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def _run(name, n, seed, dice, aji, steps=480, nuclei=None, **params):
    p = {"train": {"num_labeled": n, "seed": seed, "steps": steps, **params.pop("train", {})}, **params}
    test = {"dice": dice, "aji": aji, **({"aji_instance": nuclei[0], "pq_instance": nuclei[1]} if nuclei else {})}
    return {"rev": name + "0" * 30, "name": name, "data": {
        "params": {"params.yaml": {"data": p}},
        "metrics": {"metrics/test.json": {"data": test},
                    "metrics/train.json": {"data": {"num_train": n or 24}}}}}


def _grid():
    runs = [_run("classic", 0, 40, 0.768, 0.37, baseline={"kind": "classic"})]
    for seed, shift in zip((40, 41, 42), (0.0, 0.01, 0.02)):
        runs.append(_run(f"t1{seed}", 1, seed, 0.60 + shift, 0.30))
        runs.append(_run(f"u1{seed}", 1, seed, 0.40 + shift, 0.10, baseline={"kind": "unet"}))
    runs.append(_run("t24", 24, 40, 0.78, 0.47))
    runs.append(_run("u24", 24, 40, 0.76, 0.40, baseline={"kind": "unet"}))
    runs.append(_run("epochs", 24, 40, 0.99, 0.99, steps=0))  # trained by epochs: not on the curves
    runs.append(_run("concat", 1, 40, 0.99, 0.99, train={"fusion": "concat"}))  # on no curve
    unfinished = [  # listed by dvc with their own params but the parent's metrics: never on a curve
        {"executor": {"state": "running"}, "revs": [_run("running", 2, 40, 0.99, 0.99)]},
        {"executor": {"state": "failed"}, "revs": [_run("failed", 24, 41, 0.99, 0.99)]},
        {"executor": {"state": "queued"}, "revs": [_run("queued", 4, 40, 0.99, 0.99)]},
        {"revs": [{**_run("errored", 8, 40, 0.99, 0.99), "error": {"msg": "Experiment run failed"}}]},
    ]
    return [{"rev": "workspace", "name": None, "data": {"params": {}, "metrics": {}}, "error": {"msg": "dirty"}},
            {**runs[0], "experiments": [{"executor": {"state": "success"}, "revs": [r]}
                             for r in runs[1:]] + unfinished}]


def test_methods_are_named_from_params():
    assert method_of({}) == "textdiff"
    assert method_of({"train": {"fusion": "none"}}) == "image_only"
    assert method_of({"teacher": {"kind": "rgb"}}) == "rgb"
    assert method_of({"baseline": {"kind": "unet"}, "train": {"fusion": "none"}}) == "unet"
    assert method_of({"baseline": {"kind": "classic"}}) == "classic"
    assert method_of({"baseline": {"kind": "cellpose"}}) is None  # by epochs of its own: not comparable across N
    assert method_of({"baseline": {"kind": "cellpose", "cellpose_crops_per_epoch": 24}}) == "cellpose"
    assert method_of({"train": {"fusion": "hierarchical"}}) is None


def test_seeds_reduce_to_mean_and_sample_std_and_classic_spans_every_n():
    runs = runs_from_exp_show(_grid())
    assert sorted(r["name"] for r in runs) == sorted(
        ["classic", "t140", "t141", "t142", "u140", "u141", "u142", "t24", "u24"])
    summary = {(s["method"], s["n"]): s for s in aggregate(runs)}
    t1 = summary[("textdiff", 1)]
    assert t1["runs"] == 3 and t1["dice"] == pytest.approx(0.61) and t1["dice_std"] == pytest.approx(0.01)
    assert summary[("textdiff", 24)]["runs"] == 1 and summary[("textdiff", 24)]["dice_std"] == 0.0
    assert summary[("classic", 1)]["dice"] == summary[("classic", 24)]["dice"] == 0.768
    table = markdown(aggregate(runs))
    assert "| N = 1 | N = 24 |" in table and "61.00 ± 1.00 / 30.00 ± 0.00 (3)" in table
    assert table.index("TextDiff") < table.index("U-Net") < table.index("hematoxylin")


def test_separated_nuclei_get_their_own_table_and_columns_where_runs_scored_them(tmp_path):
    cellpose = {"kind": "cellpose", "cellpose_crops_per_epoch": 24}
    runs = runs_from_exp_show([{"rev": "base", "name": None, "data": {"params": {}, "metrics": {}}, "experiments": [
        {"revs": [_run("t1a", 1, 40, 0.60, 0.30, nuclei=(0.40, 0.35))]},
        {"revs": [_run("t1b", 1, 41, 0.62, 0.32, nuclei=(0.44, 0.37))]},
        {"revs": [_run("c1", 1, 40, 0.50, 0.20, nuclei=(0.30, 0.25), baseline=cellpose)]},
        {"revs": [_run("old", 2, 40, 0.70, 0.40)]},  # before instances: Dice and AJI only
    ]}])
    summary = aggregate(runs)
    table = markdown(summary)
    assert "Separated nuclei" in table and "42.00 ± 2.83 / 36.00 ± 1.41 (2)" in table
    assert "| Cellpose 3 from scratch (its own loop) |" in table and "30.00 / 25.00 (1)" in table
    assert "70.00 / 40.00 (1)" in table and "– / – (1)" in table  # N = 2: no per-nucleus scores
    write_csvs(summary, tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "textdiff.csv")))
    assert float(rows[0]["aji_instance"]) == pytest.approx(42.0) and rows[1]["aji_instance"] == ""
    assert (tmp_path / "cellpose.csv").exists()
    without = markdown(aggregate([r for r in runs if r["name"] == "old"]))
    assert "Separated nuclei" not in without


def test_report_curves_writes_table_plot_and_csvs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exp.json").write_text(json.dumps(_grid()))
    result = runner.invoke(app, ["report", "--curves", "--from-json", "exp.json"])
    assert result.exit_code == 0, result.output
    assert "train.steps = 480" in Path("metrics/label_efficiency.md").read_text()
    assert Path("metrics/label_efficiency.png").stat().st_size > 10_000
    rows = list(csv.DictReader(open("metrics/label_efficiency/textdiff.csv")))
    assert [r["n"] for r in rows] == ["1", "24"] and float(rows[0]["dice"]) == pytest.approx(61.0)

    mixed = _grid()
    mixed[1]["experiments"].append({"revs": [_run("other", 2, 40, 0.7, 0.4, steps=100)]})
    (tmp_path / "mixed.json").write_text(json.dumps(mixed))
    result = runner.invoke(app, ["report", "--curves", "--from-json", "mixed.json"])
    assert result.exit_code == 1 and "different train.steps budgets [100, 480]" in result.output

    for name, content, message in [("missing.json", None, "cannot read it"),
                                   ("broken.json", "[{", "not JSON (line 1"),
                                   ("other.json", json.dumps({"rev": "x"}), "not `dvc exp show --json` output")]:
        if content is not None:
            (tmp_path / name).write_text(content)
        result = runner.invoke(app, ["report", "--curves", "--from-json", name])
        assert result.exit_code == 1 and f"{name}: {message}" in result.output, result.output
        assert "Traceback" not in result.output


def test_grid_script_lists_the_runs():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "label_grid.py")], capture_output=True,
                         text=True, check=True).stdout
    lines = [line for line in out.splitlines() if line.startswith("dvc exp run")]
    assert len(lines) == 5 * (4 * 3 + 1) + 1  # 5 trained methods x (4 counts x 3 seeds + N=24) + classic
    assert any("-n le-cellpose-n1-s40" in line and "baseline.cellpose_crops_per_epoch=24" in line for line in lines)
    assert any("-n le-unet-n8-s42" in line and "baseline.kind=unet" in line for line in lines)
