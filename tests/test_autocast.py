"""`train.autocast: auto`: bfloat16 only where the hardware computes it (emulated bfloat16 made a
training step 13x slower on an AVX2 CPU), the dtype used recorded, and a bfloat16 model run in
float32 on hardware without it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import textdiff.model.card as card_module
import textdiff.runtime.device as device_module
from stages.cli import app
from textdiff.model.card import load_trained
from textdiff.paths import CLASSIFIER_DIR
from textdiff.runtime.device import native_bfloat16, resolve_autocast

CPU = torch.device("cpu")


def test_auto_is_bfloat16_exactly_where_the_hardware_computes_it(monkeypatch):
    for probe, expected in ((lambda: True, "bfloat16"), (lambda: False, "float32")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", probe)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        assert native_bfloat16(CPU) == (expected == "bfloat16")
        assert resolve_autocast("auto", CPU) == expected
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)  # AMX alone is enough
    assert resolve_autocast("auto", CPU) == "bfloat16"
    assert not native_bfloat16(torch.device("meta"))
    for named in ("float32", "bfloat16"):  # asked for by name: kept, fast or not
        assert resolve_autocast(named, CPU) == named


def _train(tiny_project, autocast: str) -> dict:
    tiny_project.write_params(train={**tiny_project.base["train"], "epochs": 1, "autocast": autocast})
    runner = CliRunner()
    if not Path("cache/features.zarr").exists():
        assert runner.invoke(app, ["extract"]).exit_code == 0
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 0, result.output
    return json.loads((CLASSIFIER_DIR / "model.json").read_text())


@pytest.mark.parametrize("native", [False, True])
def test_the_train_stage_records_the_dtype_auto_chose(tiny_project, monkeypatch, native):
    monkeypatch.setattr(device_module, "native_bfloat16", lambda device: native)
    card = _train(tiny_project, "auto")
    chosen = "bfloat16" if native else "float32"
    assert card["classifier"]["autocast"] == chosen and card["train"]["autocast"] == chosen
    assert json.loads(Path("metrics/train.json").read_text())["autocast"] == chosen


def test_a_bfloat16_model_runs_in_float32_where_bfloat16_is_emulated(tiny_project, monkeypatch, capsys):
    _train(tiny_project, "bfloat16")
    monkeypatch.setattr(card_module, "native_bfloat16", lambda device: True)
    model, card = load_trained(CLASSIFIER_DIR, CPU)
    assert model.config.autocast == card.classifier.autocast == "bfloat16"
    assert "runs in float32" not in capsys.readouterr().err
    monkeypatch.setattr(card_module, "native_bfloat16", lambda device: False)
    model, card = load_trained(CLASSIFIER_DIR, CPU)
    assert model.config.autocast == card.classifier.autocast == "float32"
    err = capsys.readouterr().err
    assert "trained under bfloat16 autocast" in err and "runs in float32 here" in err and len(err.splitlines()) == 1
    assert json.loads((CLASSIFIER_DIR / "model.json").read_text())["classifier"]["autocast"] == "bfloat16"  # untouched
