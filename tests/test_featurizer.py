"""Choosing and describing the teacher: config from the checkpoint itself, attention sizes."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_TEACHER

from textdiff.cache.spec import CacheSpec
from textdiff.encoders.image import attention_report, choose_teacher
from textdiff.errors import TextDiffError
from textdiff.params import COMPACT_ADM, load_params


def test_safetensors_without_sidecar_uses_its_header(tiny_project):
    """A teacher exported by save_checkpoint carries its config in the header: the sidecar is optional."""
    tiny_project.teacher.with_suffix(".json").unlink()
    choice = choose_teacher(load_params("params.yaml"))
    assert choice.path == tiny_project.teacher and choice.config["num_channels"] == TINY_TEACHER["num_channels"]


def test_a_sidecar_that_disagrees_with_the_header_is_refused(tiny_project):
    sidecar = tiny_project.teacher.with_suffix(".json")
    data = json.loads(sidecar.read_text())
    data["config"]["num_heads"] = 2  # loads strictly, computes something else
    sidecar.write_text(json.dumps(data))
    with pytest.raises(TextDiffError, match="do not belong together"):
        choose_teacher(load_params("params.yaml"))


def _spec(image_size: int, config: dict) -> CacheSpec:
    return CacheSpec(teacher_kind="adm", steps=(50,), blocks=(6,), image_size=image_size, views=1, dtype="float16",
                     text_encoder="t", text_hidden_size=8, text_max_length=4, data={}, teacher_config=config)


def test_attention_report_warns_only_off_the_training_distribution():
    line, warning = attention_report(_spec(256, COMPACT_ADM))  # the shipped teacher on 256 px images
    assert "64x64 (4096 tokens)" in line and "trained at 64 px: 16x16" in line
    assert warning is not None and "16x" in warning and "4096" in warning
    line, warning = attention_report(_spec(128, COMPACT_ADM))  # 32x32 = 1024 tokens: exactly 4x, allowed
    assert "32x32 (1024 tokens)" in line and warning is None
    assert attention_report(_spec(64, COMPACT_ADM))[1] is None


def test_autocast_is_in_the_spec_only_when_used_so_older_caches_keep_their_fingerprint():
    plain, bf16 = _spec(64, COMPACT_ADM), CacheSpec(**{**_spec(64, COMPACT_ADM).__dict__, "autocast": "bfloat16"})
    assert "autocast" not in plain.to_json()  # byte-identical attrs to a cache written before the field
    assert CacheSpec.from_json(plain.to_json()) == plain
    assert bf16.to_json()["autocast"] == "bfloat16" and CacheSpec.from_json(bf16.to_json()) == bf16
    assert bf16 != plain and bf16.diff(plain) == ["autocast: None -> 'bfloat16'"]
    with pytest.raises(TextDiffError, match="autocast"):
        CacheSpec.from_json({**plain.to_json(), "autocast": "int8"})


def test_the_stage_passes_autocast_to_the_teacher(tiny_project):
    import torch

    from textdiff.encoders.image import build_featurizer
    from textdiff.extract.extraction import plan_cache

    tiny_project.write_params(extract={"autocast": "bfloat16"})
    plan = plan_cache(load_params("params.yaml"))
    assert plan.spec.autocast == "bfloat16"
    assert build_featurizer(plan.spec, plan.teacher.path, torch.device("cpu")).autocast_dtype == torch.bfloat16
