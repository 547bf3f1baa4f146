"""Checkpoint loading never executes code, reports bad files in one line, round-trips."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from conftest import random_adm
from safetensors import safe_open
from safetensors.torch import save_file

from textdiff.errors import TextDiffError
from textdiff.teacher import build_adm, load_checkpoint, load_teacher, save_checkpoint
from textdiff.teacher.checkpoint import sha256_file

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "adm"
TINY = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
            learn_sigma=True, use_scale_shift_norm=True, resblock_updown=True, num_head_channels=16)


def _model(**overrides):
    return random_adm({**TINY, **overrides}, 0.02).train()


def _one_line(err: pytest.ExceptionInfo, *fragments: str) -> str:
    text = str(err.value)
    assert "\n" not in text
    for fragment in fragments:
        assert fragment in text, text
    return text


# -- malicious and broken files ---------------------------------------------------------------------


class _Payload:
    """Unpickling this would call open(marker, "w"): creating the marker proves code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("writer", ["raw-pickle", "torch-save"])
def test_malicious_pickle_is_refused_without_running(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"weight": _Payload(marker)}
    if writer == "raw-pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path)
    assert not marker.exists()
    with pytest.raises(TextDiffError) as err:
        load_checkpoint(path)
    _one_line(err, str(path), "weights-only")
    assert not marker.exists()


def test_missing_garbage_suffix_and_non_tensor_files(tmp_path):
    with pytest.raises(TextDiffError) as err:
        load_checkpoint(tmp_path / "nope.pt")
    _one_line(err, "nope.pt", "not found")

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01 definitely not a checkpoint" * 10)
    with pytest.raises(TextDiffError) as err:
        load_checkpoint(garbage)
    _one_line(err, "garbage.pt")

    bad_st = tmp_path / "garbage.safetensors"
    bad_st.write_bytes(b"\xff" * 64)
    with pytest.raises(TextDiffError) as err:
        load_checkpoint(bad_st)
    _one_line(err, "garbage.safetensors", "safetensors")

    ckpt = tmp_path / "weights.ckpt"
    ckpt.write_bytes(b"x")
    with pytest.raises(TextDiffError) as err:
        load_checkpoint(ckpt)
    _one_line(err, "weights.ckpt", "unsupported checkpoint suffix")

    not_mapping = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_mapping)
    with pytest.raises(TextDiffError) as err:
        load_checkpoint(not_mapping)
    _one_line(err, "list.pt", "mapping of parameter names to tensors")

    mixed = tmp_path / "mixed.pt"
    torch.save({"a": torch.zeros(1), "step": 3}, mixed)
    with pytest.raises(TextDiffError) as err:
        load_checkpoint(mixed)
    _one_line(err, "mixed.pt", "'step'")


def test_unwraps_training_dicts_and_strips_module_prefix(tmp_path):
    sd = {"module.a.weight": torch.ones(2), "module.b": torch.zeros(1, dtype=torch.float16)}
    for wrapper in ("state_dict", "model", "ema"):
        path = tmp_path / f"{wrapper}.pth"
        torch.save({wrapper: sd, "step": 10, "opt": {"lr": 1e-4}}, path)
        loaded = load_checkpoint(path)
        assert sorted(loaded) == ["a.weight", "b"]
        assert loaded["b"].dtype == torch.float32
    both = tmp_path / "both.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "ema": {"w": torch.ones(1)}}, both)
    assert load_checkpoint(both)["w"].item() == 1.0  # EMA weights preferred


# -- load_teacher -----------------------------------------------------------------------------------


def test_load_teacher_strict_with_one_line_mismatch_report(tmp_path):
    model = _model()
    sd = model.state_dict()
    path = tmp_path / "teacher.pt"
    torch.save(sd, path)
    teacher = load_teacher(path, TINY)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, sd[k]), k

    broken = dict(sd)
    for key in list(broken)[:4]:
        del broken[key]
    broken["extra.weight"] = torch.zeros(1)
    broken["out.2.weight"] = torch.zeros(3, 32, 3, 3)
    torch.save(broken, path)
    with pytest.raises(TextDiffError) as err:
        load_teacher(path, TINY)
    text = _one_line(err, str(path), "4 missing", "1 unexpected", "1 shape-mismatched", "extra.weight", "out.2.weight")
    assert "time_embed.0.weight" in text and ", ..." in text

    with pytest.raises(TextDiffError) as err:
        load_teacher(path, {**TINY, "num_channels": 48})
    _one_line(err, "num_channels")


def test_save_and_reload_with_sidecar_and_half_precision(tmp_path):
    model = _model()
    path = save_checkpoint(model, tmp_path / "out" / "teacher.safetensors", extra_metadata={"step": 7})
    assert path == tmp_path / "out" / "teacher.safetensors"
    sidecar = json.loads((tmp_path / "out" / "teacher.json").read_text())
    assert sidecar == {"config": model.config, "step": 7}
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["config"]) == model.config
        assert set(f.keys()) == set(model.state_dict())
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]

    reloaded = load_teacher(path)  # config from the sidecar
    x, t = torch.rand(1, 3, 16, 16) * 2 - 1, torch.tensor([20])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x, t), model.eval()(x, t), rtol=0, atol=0)

    half = save_checkpoint(model, tmp_path / "half.safetensors", dtype=torch.bfloat16)
    assert half.stat().st_size < 0.6 * path.stat().st_size
    sd = load_checkpoint(half)
    assert all(v.dtype == torch.float32 for v in sd.values())
    ref = model.state_dict()["out.2.weight"]
    torch.testing.assert_close(sd["out.2.weight"], ref.to(torch.bfloat16).float())

    (tmp_path / "half.json").unlink()  # falls back to the config in the safetensors header
    assert load_teacher(half).config == model.config


def test_load_teacher_without_config_or_sidecar_and_bad_sidecar(tmp_path):
    path = tmp_path / "t.pt"
    torch.save(_model().state_dict(), path)
    with pytest.raises(TextDiffError) as err:
        load_teacher(path)
    _one_line(err, "t.pt", "no teacher config")
    (tmp_path / "t.json").write_text("{not json")
    with pytest.raises(TextDiffError) as err:
        load_teacher(path)
    _one_line(err, "t.json", "not valid JSON")
    (tmp_path / "t.json").write_text(json.dumps({"config": TINY}))
    assert load_teacher(path).config["num_channels"] == 32


def test_sidecar_that_disagrees_with_the_stored_config_is_refused(tmp_path):
    """Head count changes no weight shape: a stale sidecar would load strictly and compute garbage."""
    path = save_checkpoint(_model(), tmp_path / "t.safetensors")
    sidecar = json.loads((tmp_path / "t.json").read_text())
    sidecar["config"]["num_head_channels"] = 32
    (tmp_path / "t.json").write_text(json.dumps(sidecar))
    with pytest.raises(TextDiffError) as err:
        load_teacher(path)
    _one_line(err, "t.json", "differs", "t.safetensors")
    assert load_teacher(path, TINY).config["num_head_channels"] == 16  # an explicit config is the user's word


def test_save_checkpoint_rejects_bad_arguments(tmp_path):
    model = _model()
    with pytest.raises(TextDiffError, match="safetensors"):
        save_checkpoint(model, tmp_path / "x.pt")
    with pytest.raises(TextDiffError, match="dtype"):
        save_checkpoint(model, tmp_path / "x.safetensors", dtype="int8")
    with pytest.raises(TextDiffError, match="no .config"):
        save_checkpoint(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")


def test_safetensors_from_elsewhere_and_sha256(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"module.w": torch.ones(2, dtype=torch.float16)}, str(path))
    sd = load_checkpoint(path)
    assert list(sd) == ["w"] and sd["w"].dtype == torch.float32
    import hashlib

    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(TextDiffError, match="missing.bin"):
        sha256_file(tmp_path / "missing.bin")


@pytest.mark.skipif(not (FIXTURES / "adm_small_state_dict.pt").is_file(), reason=f"fixtures not found in {FIXTURES}")
def test_guided_diffusion_fixture_loads_as_teacher():
    io = torch.load(FIXTURES / "adm_small_io.pt", weights_only=True)
    teacher = load_teacher(FIXTURES / "adm_small_state_dict.pt", io["config"])
    with torch.no_grad():
        assert (teacher(io["x_t"], io["t"]) - io["output"]).abs().max().item() <= 1e-4


# -- sharded checkpoints (Hugging Face convention) ---------------------------------------------

SHARDED = dict(TINY)  # 3.2 MiB in float32: four shards of at most 1 MiB


def _sharded(tmp_path, shard_mb=1.0, **kwargs):
    torch.manual_seed(0)
    model = build_adm(SHARDED)
    return model, save_checkpoint(model, tmp_path / "t.safetensors", shard_mb=shard_mb, **kwargs)


def test_a_large_checkpoint_is_written_as_shards_with_an_index_and_loads_like_one_file(tmp_path):
    model, index = _sharded(tmp_path, extra_metadata={"steps": 3})
    assert index.name == "t.safetensors.index.json"
    shards = sorted(tmp_path.glob("t-*-of-*.safetensors"))
    assert len(shards) >= 3 and not (tmp_path / "t.safetensors").exists()
    assert shards[0].name == f"t-00001-of-{len(shards):05d}.safetensors"
    assert all(s.stat().st_size <= 2**20 for s in shards)  # the limit holds for whole files
    data = json.loads(index.read_text())
    assert set(data["weight_map"]) == set(model.state_dict())
    assert sorted(set(data["weight_map"].values())) == [s.name for s in shards]
    loaded = load_teacher(index)  # config from the sidecar t.json
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert json.loads((tmp_path / "t.json").read_text())["steps"] == 3
    (tmp_path / "t.json").unlink()  # the config is also in every shard's header
    assert load_teacher(index).config["num_channels"] == 32
    with pytest.raises(TextDiffError) as err:  # a tensor larger than a shard: said, not silently oversized
        save_checkpoint(model, tmp_path / "u.safetensors", shard_mb=0.1)
    _one_line(err, "more than a shard may hold")


def test_a_missing_or_corrupt_shard_is_one_line_naming_the_shard(tmp_path):
    _, index = _sharded(tmp_path)
    second = sorted(tmp_path.glob("t-00002-of-*.safetensors"))[0]
    second.write_bytes(second.read_bytes()[:100])
    with pytest.raises(TextDiffError) as err:
        load_teacher(index)
    _one_line(err, second.name, "not a readable safetensors file")
    second.unlink()
    with pytest.raises(TextDiffError) as err:
        load_teacher(index)
    _one_line(err, second.name, "shard of t.safetensors.index.json not found")
    index.write_text("{not json")
    with pytest.raises(TextDiffError) as err:
        load_checkpoint(index)
    _one_line(err, index.name, "not a valid checkpoint index")


def test_the_sharded_identity_changes_with_any_shard_and_re_exports_leave_no_stale_layout(tmp_path):
    from textdiff.teacher import checkpoint_sha256

    model, index = _sharded(tmp_path)
    before = checkpoint_sha256(index)
    last = sorted(tmp_path.glob("t-*-of-*.safetensors"))[-1]
    save_file({"x": torch.zeros(1)}, str(last))
    assert checkpoint_sha256(index) != before
    single = save_checkpoint(model, tmp_path / "t.safetensors", shard_mb=15)  # fits: one file again
    assert single.name == "t.safetensors"
    assert not list(tmp_path.glob("t-*-of-*.safetensors")) and not index.exists()
    assert checkpoint_sha256(single) == sha256_file(single)  # single files keep their old identity
    _sharded(tmp_path)
    assert not (tmp_path / "t.safetensors").exists()  # and the other way round


def test_an_export_that_dies_between_shards_leaves_no_index_to_trust(tmp_path, monkeypatch):
    import safetensors.torch

    model, index = _sharded(tmp_path)  # a complete earlier export
    calls = []
    real = safetensors.torch.save_file

    def dying(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", dying)
    torch.manual_seed(1)
    with pytest.raises(OSError):
        save_checkpoint(build_adm(SHARDED), tmp_path / "t.safetensors", shard_mb=1.0)
    assert not index.exists()  # shard 1 is new, the rest old: nothing may bind them
    with pytest.raises(TextDiffError) as err:
        load_teacher(index)
    _one_line(err, "checkpoint index not found")
