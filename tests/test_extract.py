"""Stage one: the zarr cache holds exactly what the teacher gave, resumes, and verifies itself."""

from pathlib import Path

import numpy as np
import torch
import zarr
from typer.testing import CliRunner

from stages import extract as extract_stage
from stages.cli import app
from textdiff.cache.store import FeatureCache
from textdiff.data.prepared import load_prepared
from textdiff.encoders.image import images_to_model_range
from textdiff.encoders.text import TextEncoder
from textdiff.errors import TextDiffError
from textdiff.teacher import Diffusion, FeatureExtractor, load_teacher

runner = CliRunner()
CACHE = Path("cache/features.zarr")


def _extract(*args):
    return runner.invoke(app, ["extract", *args])


def test_round_trip_equals_the_teacher(tiny_project):
    result = _extract()
    assert result.exit_code == 0, result.output
    cache = FeatureCache(CACHE)
    assert cache.spec.steps == (10, 100) and cache.spec.blocks == (0, 3)

    teacher = load_teacher(tiny_project.teacher)
    extractor = FeatureExtractor(teacher, Diffusion(), steps=[10, 100], blocks=[0, 3], noise_seed=0)
    for split in ("train", "test"):
        prepared = load_prepared("data/prepared", split)
        expected = extractor(images_to_model_range(prepared.images))
        cached = cache.split(split)
        assert cached.ids == list(prepared.ids)
        for i in range(len(prepared)):
            for b, got in zip([0, 3], cached.features(i)):
                assert got.dtype == torch.float16
                assert got.shape == (1, *expected[b][i].shape)  # [views, steps, C, H, W]
                torch.testing.assert_close(got[0].float(), expected[b][i], atol=2e-3, rtol=2e-3)
            np.testing.assert_array_equal(cached.mask(i, 0).numpy(), prepared.masks[i])
            np.testing.assert_array_equal(cached.image(i), prepared.images[i])
    # text: what the encoder gives, stored unchanged
    emb = TextEncoder("", max_length=8).encode(list(load_prepared("data/prepared", "val").texts))
    tokens, mask, pooled = cache.split("val").text(1)
    np.testing.assert_allclose(tokens.numpy(), emb.tokens[1], atol=1e-5)
    np.testing.assert_array_equal(mask.numpy(), emb.mask[1])
    np.testing.assert_allclose(pooled.numpy(), emb.pooled[1], atol=1e-5)
    attrs = zarr.open_group(str(CACHE), mode="r").attrs
    assert len(attrs["fingerprint"]["teacher_sha256"]) == 64
    assert "torch" in attrs["provenance"]


def test_eight_views_store_the_transformed_masks(tiny_project):
    tiny_project.write_params(extract={"views": 8, "batch_size": 2})
    assert _extract().exit_code == 0
    split = FeatureCache(CACHE).split("train")
    masks = split.mask(0)
    assert masks.shape[0] == 8
    assert torch.equal(masks[1], torch.rot90(masks[0], 1, (-2, -1)))
    assert torch.equal(masks[4], torch.flip(masks[0], (-1,)))


def test_resume_after_a_kill_redoes_only_unfinished_images(tiny_project, monkeypatch):
    calls = {"n": 0, "images": 0}
    real_submit = FeatureExtractor.submit  # what extract calls per batch

    def dying(self, images):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the second batch of train dies mid-run
        calls["images"] += images.shape[0]
        return real_submit(self, images)

    monkeypatch.setattr(FeatureExtractor, "submit", dying)
    killed = _extract()
    assert killed.exit_code == 130
    flags = zarr.open_group(str(CACHE), mode="r")["train"]["complete"][:]
    assert flags.tolist() == [1, 1, 0]
    assert extract_stage.verify(Path("params.yaml"))  # incomplete -> problems reported

    calls.update(n=10, images=0)
    assert _extract().exit_code == 0
    assert calls["images"] == 1 + 2 + 2  # the unfinished train image, then val and test
    assert extract_stage.verify(Path("params.yaml")) == []


def test_the_gpu_s_threaded_parallel_writer_stores_zarr_s_bytes(tiny_project, monkeypatch):
    """On CUDA a writer thread fills many chunks at once, each written by ImageChunkWriter; forced
    here on the CPU, every chunk file must equal the one zarr's own `array[i] = value` writes."""
    import shutil

    import textdiff.extract.extraction as extraction
    from textdiff.extract.writer import BackgroundWriter

    class ZarrOnly:  # the reference: zarr's own write path for every chunk
        fast = False

        def __init__(self, array):
            self.array = array

        def __call__(self, i, value):
            self.array[i] = value

    with monkeypatch.context() as m:
        m.setattr(extraction, "ImageChunkWriter", ZarrOnly)
        assert _extract().exit_code == 0

    def chunks(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes()
                for p in sorted(root.rglob("*")) if p.is_file() and "/c/" in str(p)}

    before = chunks(CACHE)
    shutil.rmtree(CACHE)
    monkeypatch.setattr(extraction, "BackgroundWriter", lambda **_: BackgroundWriter(threaded=True, workers=4))
    assert _extract().exit_code == 0
    after = chunks(CACHE)
    assert len(before) > 10 and after.keys() == before.keys()
    assert all(after[k] == before[k] for k in before)
    assert extract_stage.verify(Path("params.yaml")) == []


def test_verify_catches_a_missing_chunk_and_a_param_mismatch(tiny_project):
    assert _extract().exit_code == 0
    ok = runner.invoke(app, ["cache", "verify"])
    assert ok.exit_code == 0, ok.output

    chunk = CACHE / "test" / "block_3" / "c" / "1" / "0" / "0" / "0" / "0" / "0"
    assert chunk.is_file()
    chunk.unlink()
    bad = runner.invoke(app, ["cache", "verify"])
    assert bad.exit_code == 1
    assert "block_3" in bad.output and "img_test_1" in bad.output and "Traceback" not in bad.output

    tiny_project.write_params(teacher={"steps": [10, 200]})
    mismatch = runner.invoke(app, ["cache", "verify"])
    assert mismatch.exit_code == 1 and "steps" in mismatch.output


def test_an_image_without_nuclei_is_cached_and_lost_chunks_of_any_array_are_caught(tiny_project):
    """zarr skips chunks equal to the fill value, so an all-zero mask used to look like a lost chunk;
    the cache now stores every chunk, and verify checks every array (text and ground truth too:
    zarr would read a lost one as zeros and score it without a word)."""
    from PIL import Image

    from stages import prepare

    mask = tiny_project.data_root / "Train_Folder" / "labelcol" / "img_train_1.png"
    Image.fromarray(np.zeros(np.asarray(Image.open(mask)).shape, np.uint8)).save(mask)  # no nuclei
    labels = Path(f"{tiny_project.data_root}-instances") / "Train" / "img_train_1.png"
    Image.fromarray(np.zeros(np.asarray(Image.open(labels)).shape, np.uint16)).save(labels)  # nor instances
    prepare.run(tiny_project.params_path)
    result = _extract()
    assert result.exit_code == 0, result.output
    assert (CACHE / "train" / "masks" / "c" / "1" / "0" / "0" / "0").is_file()  # stored although all zero
    assert runner.invoke(app, ["cache", "verify"]).exit_code == 0
    assert FeatureCache(CACHE).split("train").mask(1).sum() == 0

    for lost, name in [("train/text_tokens/c", "text_tokens"), ("test/release_masks/c/1", "release_masks")]:
        target = CACHE / lost
        moved = target.with_name(target.name + ".aside")
        target.rename(moved)
        bad = runner.invoke(app, ["cache", "verify"])
        assert bad.exit_code == 1 and f"/{name}: " in bad.output and "missing on disk" in bad.output, bad.output
        try:
            FeatureCache(CACHE)
            raise AssertionError("a cache with a lost chunk was opened")
        except TextDiffError as err:
            assert name in str(err)
        moved.rename(target)

    array_json = CACHE / "train" / "block_3" / "zarr.json"
    saved = array_json.read_bytes()
    array_json.unlink()
    bad = runner.invoke(app, ["train"])  # FeatureCache checks against the cache's own spec
    assert bad.exit_code == 1 and "block_3: array missing" in bad.output and "Traceback" not in bad.output
    array_json.write_bytes(saved)


def test_a_damaged_chunk_stops_training_in_one_line(tiny_project):
    assert _extract().exit_code == 0
    chunk = CACHE / "train" / "block_3" / "c" / "0" / "0" / "0" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:50])  # on disk, so verify passes; the codec fails on reading
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "block_3: cannot read item 0" in result.output and "damaged" in result.output
    assert not Path("models/classifier/model.pt").exists()


def test_other_params_rebuild_or_refuse_never_mix(tiny_project):
    assert _extract().exit_code == 0
    tiny_project.write_params(teacher={"steps": [20, 100]})
    refused = _extract("--no-rebuild")
    assert refused.exit_code == 1 and "other params" in refused.output and "steps" in refused.output
    assert FeatureCache(CACHE).spec.steps == (10, 100)  # untouched
    rebuilt = _extract()
    assert rebuilt.exit_code == 0 and "rebuilding" in rebuilt.output
    assert FeatureCache(CACHE).spec.steps == (20, 100)


def test_bad_teacher_checkpoint_is_one_line(tiny_project):
    garbage = tiny_project.root / "models" / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    config = {"image_size": 32, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2"}
    tiny_project.write_params(teacher={"checkpoint": str(garbage), "config": config})
    result = _extract()
    assert result.exit_code == 1
    assert "garbage.pt" in result.output and "Traceback" not in result.output
    assert not CACHE.exists()

    tiny_project.write_params(teacher={"checkpoint": "models/missing.safetensors"})
    result = _extract()
    assert result.exit_code == 1 and "missing.safetensors" in result.output


def test_rgb_control_caches_the_pixels_themselves(tiny_project):
    tiny_project.write_params(teacher={"kind": "rgb", "checkpoint": ""})
    result = _extract()
    assert result.exit_code == 0, result.output
    cache = FeatureCache(CACHE)
    assert cache.spec.teacher_kind == "rgb" and cache.spec.blocks == (0,)
    assert cache.block_channels() == [3] and len(cache.spec.steps) == 1
    prepared = load_prepared("data/prepared", "train")
    (got,) = cache.split("train").features(0, view=0)
    expected = images_to_model_range(prepared.images[:1])[0]
    torch.testing.assert_close(got[0].float(), expected, atol=1e-2, rtol=0)
    assert runner.invoke(app, ["train"]).exit_code == 0


def test_guided_diffusion_pt_checkpoint_with_teacher_config(tiny_project):
    """The paper's route: an OpenAI-style .pt state dict (no sidecar) + teacher.config."""
    from conftest import TINY_TEACHER

    from textdiff.teacher import build_adm

    torch.manual_seed(1)
    model = build_adm(TINY_TEACHER)
    pt = tiny_project.root / "models" / "256x256_diffusion_uncond.pt"
    torch.save(model.state_dict(), pt)
    tiny_project.write_params(teacher={"checkpoint": str(pt), "config": dict(TINY_TEACHER)})
    result = _extract()
    assert result.exit_code == 0, result.output
    cache = FeatureCache(CACHE)
    assert cache.spec.teacher_config["num_channels"] == 32

    # Without teacher.config an OpenAI .pt has no architecture: one clear line.
    tiny_project.write_params(teacher={"checkpoint": str(pt), "config": {}})
    result = _extract()
    assert result.exit_code == 1 and "teacher.config" in result.output
    # ... but a broken file says so, not "set teacher.config" (which would not help).
    for name, content, reason in [("empty.safetensors", b"", "the file is empty"),
                                  ("noise.safetensors", bytes(range(256)) * 4, "not a readable safetensors file"),
                                  ("noise.pt", b"PK-not-really" * 50, "not a PyTorch checkpoint")]:
        broken = tiny_project.root / "models" / name
        broken.write_bytes(content)
        tiny_project.write_params(teacher={"checkpoint": str(broken), "config": {}})
        result = _extract()
        assert result.exit_code == 1 and f"{name}: {reason}" in result.output, result.output
        assert "set teacher.config" not in result.output

    # A config that does not match the weights: counts and key names, one line.
    wrong = dict(TINY_TEACHER, num_channels=64, num_head_channels=32)
    tiny_project.write_params(teacher={"checkpoint": str(pt), "config": wrong})
    result = _extract()
    assert result.exit_code == 1 and "256x256_diffusion_uncond.pt" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
