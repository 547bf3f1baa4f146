"""The product is the DVC pipeline: `dvc repro`, `dvc exp run -S`, `dvc metrics diff`, report.

Runs the real dvc.yaml in a temporary git repo holding a copy of the project, on the real MoNuSeg
images at 64 px with a tiny teacher and 2 epochs.
"""

import json
import subprocess
from pathlib import Path

import pytest
from conftest import checkout_project

TINY = {
    "data": {"image_size": 64, "mode": "resize"},
    "pretrain": {
        "config": {"image_size": 32, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2,2",
                   "attention_resolutions": "8", "num_head_channels": 16, "learn_sigma": True,
                   "use_scale_shift_norm": True, "resblock_updown": True},
        "steps": 3, "batch_size": 2, "checkpoint_every": 3, "samples": 1, "sample_steps": 2,
    },
    "extract": {"batch_size": 8},
    "teacher": {"kind": "adm", "checkpoint": "", "config": {}, "steps": [50, 150], "blocks": [1, 5]},
    "train": {"fusion": "cross_attention", "contrastive_weight": 0.0, "epochs": 2, "d_model": 16, "heads": 2,
              "num_labeled": 6},
    "evaluate": {"panels": 2},
}


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{output[-4000:]}"
    return output


@pytest.fixture
def project_copy(tmp_path, monuseg_root):
    return checkout_project(tmp_path / "project", {**TINY, "data": {**TINY["data"], "root": str(monuseg_root)}})


def test_repro_experiment_metrics_diff_and_report(project_copy):
    work, env = project_copy
    out = _run(["dvc", "repro"], work, env)
    for stage in ("prepare", "pretrain", "extract", "train", "evaluate"):
        assert f"Running stage '{stage}'" in out
    metrics = json.loads((work / "metrics/test.json").read_text())
    per_image = json.loads((work / "metrics/test_per_image.json").read_text())["images"]
    assert metrics["num_images"] == len(per_image) == 14  # every MoNuSeg test image was scored
    assert metrics["dice"] == pytest.approx(sum(r["dice"] for r in per_image) / 14)
    assert (work / "cache/features.zarr").is_dir() and (work / "models/classifier/model.pt").is_file()
    _run(["git", "add", "-A"], work, env)
    _run(["git", "commit", "-qm", "baseline"], work, env)

    # Exact invalidation: editing the classifier leaves the teacher's half of the pipeline up to date.
    classifier = work / "textdiff/model/classifier.py"
    classifier.write_text(classifier.read_text() + "\n# an edit\n")
    status = json.loads(_run(["dvc", "status", "--json"], work, env).strip().splitlines()[-1])
    assert sorted(status) == ["evaluate", "train"], status
    _run(["git", "checkout", "--", "textdiff/model/classifier.py"], work, env)

    out = _run(["dvc", "exp", "run", "-S", "train.fusion=none"], work, env)
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out
    for stage in ("prepare", "pretrain", "extract"):
        assert f"Running stage '{stage}'" not in out
    assert "Stage 'extract' didn't change" in out

    diff = _run(["dvc", "metrics", "diff"], work, env)
    assert "metrics/test.json" in diff and "dice" in diff

    show = _run(["dvc", "exp", "show", "--json"], work, env)
    (work / "exp.json").write_text(show)
    report = _run(["textdiff", "report", "--from-json", "exp.json"], work, env)
    table = (work / "metrics/ablation.md").read_text()
    assert "| ζ1 |" in table and "| TextDiff |" in table and report.strip()

    # An invalid value is refused before any work, with one line and no traceback.
    bad = subprocess.run(["dvc", "exp", "run", "-S", "train.fusion=foo"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    assert "train.fusion must be one of" in bad.stdout + bad.stderr
    assert "Traceback" not in bad.stdout + bad.stderr
