"""The teacher committed under models/teacher/ is what params.yaml uses by default: it must load
through `teacher.checkpoint` exactly as a user's guided-diffusion file would, stay within the
16 MiB-per-file budget, say how it was trained, and run at the pipeline's image size."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from textdiff.params import load_params
from textdiff.teacher import Diffusion, FeatureExtractor, block_shapes, load_teacher, sha256_file
from textdiff.teacher.checkpoint import read_sidecar_config, sidecar_path

REPO = Path(__file__).resolve().parents[1]
MAX_FILE_BYTES = 16 * 2**20


@pytest.fixture(scope="module")
def shipped():
    params = load_params(REPO / "params.yaml")
    assert params.teacher.checkpoint, "params.yaml should point teacher.checkpoint at the shipped teacher"
    path = REPO / params.teacher.checkpoint
    assert path.is_file(), f"{path} is missing (it is committed to git, not produced by a stage)"
    return params, path


def test_default_params_point_at_a_committed_teacher(shipped):
    params, path = shipped
    assert path.parent == REPO / "models" / "teacher"
    assert path.stat().st_size <= MAX_FILE_BYTES
    assert params.teacher.config == {}, "the architecture comes from the sidecar JSON"


def test_sidecar_records_how_it_was_trained(shipped):
    _, path = shipped
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["trained_on"] == ["train", "val"], "the teacher must never have seen test images"
    assert meta["steps"] > 600, "the shipped teacher should be trained past the CPU default budget"
    assert 0 < meta["ema_decay"] < 1
    card = (path.parent / "README.md").read_text()
    assert str(meta["steps"]) in card and sha256_file(path) in card, "the model card names the file it describes"


def test_loads_strictly_in_bf16_and_casts_to_float32(shipped):
    _, path = shipped
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"}
    model = load_teacher(path)  # config from the sidecar, strict key/shape check
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())


def test_features_at_the_pipeline_size_have_the_documented_shapes(shipped):
    params, path = shipped
    model = load_teacher(path)
    config = read_sidecar_config(path)
    size = params.data.image_size
    extractor = FeatureExtractor(model, Diffusion(params.teacher.schedule, params.teacher.diffusion_steps),
                                 steps=(50,), blocks=tuple(params.teacher.blocks))
    images = torch.zeros(1, 3, size, size)
    features = extractor(images)
    expected = block_shapes(config, params.teacher.blocks, size)
    for b, (c, h, w) in expected.items():
        assert features[b].shape == (1, 1, c, h, w)
        assert torch.isfinite(features[b]).all()


def test_the_extract_stage_depends_on_the_shipped_folder():
    """Replacing the shipped file must make `dvc repro` re-run extract."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert "models/teacher" in dvc["stages"]["extract"]["deps"]


def test_the_gpu_teacher_ships_in_shards_that_load_and_match_its_model_card():
    from textdiff.teacher import checkpoint_sha256
    from textdiff.teacher.checkpoint import shard_paths

    index = REPO / "models" / "teacher" / "monuseg-adm64.safetensors.index.json"
    shards = shard_paths(index)
    assert len(shards) == 3 and all(s.stat().st_size <= 15 * 2**20 for s in shards)
    model = load_teacher(index)  # every key of the index, strictly, from the shards
    assert sum(p.numel() for p in model.parameters()) == 22_771_782
    meta = json.loads(sidecar_path(index).read_text())
    assert meta["trained_on"] == ["train", "val"] and meta["steps"] == 3786
    card = (REPO / "models" / "teacher" / "README.md").read_text()
    assert checkpoint_sha256(index) in card, "the model card names the shards it describes"
    assert all(sha256_file(s)[:8] in card for s in shards)
