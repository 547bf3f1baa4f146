"""The `prepare` stage end to end, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml
from typer.testing import CliRunner

from stages.cli import app
from textdiff.data.prepared import load_prepared

runner = CliRunner()


def write_params(folder: Path, root: Path, image_size: int = 32) -> Path:
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump({"data": {"root": str(root), "image_size": image_size}}))
    return path


def prepare(*args: str):
    return runner.invoke(app, ["prepare", *args])


def leftovers(folder: Path) -> list[str]:
    """Hidden temp/old folders that a failed prepare must not leave behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_prepare_writes_all_splits(tiny_monuseg, tmp_path, monkeypatch):
    root = tiny_monuseg()
    write_params(tmp_path, root)
    monkeypatch.chdir(tmp_path)
    result = prepare()
    assert result.exit_code == 0, result.output
    assert "train:   3 images, 32x32" in result.output and "data/prepared" in result.output
    out = tmp_path / "data" / "prepared"
    for split, n in {"train": 3, "val": 2, "test": 2}.items():
        got = load_prepared(out, split)
        assert got.images.shape == (n, 32, 32, 3) and got.masks.shape == (n, 32, 32)
        assert set(np.unique(got.masks)) == {0, 1}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source_root"] == str(root.resolve()) and manifest["image_size"] == 32
    assert leftovers(out.parent) == []


def test_prepare_relative_root_and_params_option(tiny_monuseg, tmp_path, monkeypatch):
    tiny_monuseg(name="ds")
    (tmp_path / "conf").mkdir()
    params = write_params(tmp_path / "conf", Path("ds"), image_size=16)
    monkeypatch.chdir(tmp_path)
    result = prepare("--params", str(params))
    assert result.exit_code == 0, result.output
    assert load_prepared(tmp_path / "data" / "prepared", "val").images.shape == (2, 16, 16, 3)


def test_prepare_broken_dataset_fails_cleanly(tiny_monuseg, tmp_path, monkeypatch):
    root = tiny_monuseg()
    bad = root / "Test_Folder" / "img" / "img_test_1.tif"
    bad.write_bytes(b"garbage")
    write_params(tmp_path, root)
    monkeypatch.chdir(tmp_path)
    result = prepare()
    assert result.exit_code == 1
    assert "error:" in result.output and str(bad) in result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert not (tmp_path / "data" / "prepared").exists()
    assert not (tmp_path / "data").exists() or leftovers(tmp_path / "data") == []


def test_failed_prepare_keeps_previous_output(tiny_monuseg, tmp_path, monkeypatch):
    root = tiny_monuseg()
    write_params(tmp_path, root)
    monkeypatch.chdir(tmp_path)
    assert prepare().exit_code == 0
    out = tmp_path / "data" / "prepared"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (root / "Val_Folder" / "labelcol" / "img_val_0.png").unlink()
    result = prepare()
    assert result.exit_code == 1 and "img_val_0" in result.output and "Traceback" not in result.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(out.parent) == []


def test_prepare_bad_params(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("data: {root: nowhere, image_size: 30}\n")
    result = prepare()
    assert result.exit_code == 1 and "data.image_size" in result.output
    (tmp_path / "params.yaml").write_text("data: {root: nowhere}\n")
    result = prepare()
    assert result.exit_code == 1 and "nowhere" in result.output and "Traceback" not in result.output


def test_prepare_real_data_small(monuseg_root, tmp_path, monkeypatch):
    write_params(tmp_path, monuseg_root, image_size=64)
    monkeypatch.chdir(tmp_path)
    result = prepare()
    assert result.exit_code == 0, result.output
    out = tmp_path / "data" / "prepared"
    for split, n in {"train": 24, "val": 6, "test": 14}.items():
        got = load_prepared(out, split)
        assert got.images.shape == (n, 64, 64, 3) and got.images.dtype == np.uint8
        assert got.masks.shape == (n, 64, 64) and set(np.unique(got.masks)) == {0, 1}
        assert got.ids == sorted(got.ids) and all(t.strip() for t in got.texts)
    assert sum(p.stat().st_size for p in out.iterdir()) < 4 * 2**20


def test_relative_root_inside_a_queued_experiment_copy(tmp_path):
    """`dvc queue start` runs stages in <repo>/.dvc/tmp/exps/<tmp>: ../shared must still resolve."""
    from textdiff.paths import resolve_data_root

    repo = tmp_path / "repo"
    (tmp_path / "shared" / "data").mkdir(parents=True)
    temp = repo / ".dvc" / "tmp" / "exps" / "tmpabc123"
    temp.mkdir(parents=True)
    assert resolve_data_root("../shared/data", cwd=temp) == repo / "../shared/data"
    assert resolve_data_root("../shared/data", cwd=repo) == repo / "../shared/data"
    assert resolve_data_root("/abs/path") == Path("/abs/path")
    assert resolve_data_root("../missing", cwd=temp) == temp / "../missing"  # error names the literal path
