"""The in-domain teacher: DDPM training lowers the loss, resumes, exports a loadable teacher,
and never sees a test image."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from stages.cli import app
from textdiff.cache.store import FeatureCache
from textdiff.pretrain.loop import CropSampler, new_state, pretrain, resume_state
from textdiff.teacher import Diffusion, load_teacher, sha256_file

runner = CliRunner()

TINY_PRETRAIN = {"image_size": 16, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
                 "attention_resolutions": "8", "num_head_channels": 16, "learn_sigma": True,
                 "use_scale_shift_norm": True, "resblock_updown": True}


def _pretrain_params(project, steps, **extra):
    return project.write_params(
        teacher={"checkpoint": "", "steps": [10, 100], "blocks": [0, 3]},
        pretrain={"config": TINY_PRETRAIN, "steps": steps, "batch_size": 4, "lr": 1e-3, "warmup": 0,
                  "checkpoint_every": 2, "samples": 2, "sample_steps": 3, **extra},
    )


def test_a_few_steps_lower_the_loss():
    rng = np.random.default_rng(0)
    images = np.zeros((4, 32, 32, 3), np.uint8)
    images[..., 0] = 200
    images[:, 8:20, 8:20] = (60, 20, 120)
    images = np.clip(images + rng.integers(0, 10, images.shape), 0, 255).astype(np.uint8)
    diffusion = Diffusion()
    sampler = CropSampler(images, 16, seed=0)
    state = new_state(TINY_PRETRAIN, lr=2e-3, weight_decay=0.0, seed=0, device=torch.device("cpu"))

    gen = torch.Generator().manual_seed(1)
    x0 = sampler.sample(8)
    t = torch.randint(1000, (8,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)

    def held_out_mse():
        with torch.no_grad():
            return diffusion.training_losses(state.model.eval(), x0, t, noise)["mse"].mean().item()

    before = held_out_mse()
    pretrain(state, diffusion, sampler, total_steps=40, batch_size=8, lr=2e-3, warmup=0, ema_decay=0.9,
             grad_clip=1.0, device=torch.device("cpu"), progress=False)
    after = held_out_mse()
    assert state.step == 40 and len(state.losses) == 40
    assert after < 0.6 * before, (before, after)


def test_stage_resumes_exports_and_never_reads_test(tiny_project, monkeypatch):
    import textdiff.pretrain.loop as stage

    read = []
    real = stage.load_prepared
    monkeypatch.setattr(stage, "load_prepared", lambda d, split: read.append(split) or real(d, split))
    Path("data/prepared/test.npz").unlink()  # pretraining must not need it

    _pretrain_params(tiny_project, steps=4)
    first = runner.invoke(app, ["pretrain"])
    assert first.exit_code == 0, first.output
    assert set(read) == {"train", "val"}
    summary = json.loads(Path("models/pretrain/summary.json").read_text())
    assert summary["steps"] == 4 and summary["steps_this_run"] == 4

    _pretrain_params(tiny_project, steps=6)  # a longer budget continues where it stopped
    second = runner.invoke(app, ["pretrain"])
    assert second.exit_code == 0, second.output
    assert "resuming at step 4" in second.output
    summary = json.loads(Path("models/pretrain/summary.json").read_text())
    assert summary["steps"] == 6 and summary["steps_this_run"] == 2
    assert len(Path("models/pretrain/loss.tsv").read_text().split()) == 1 + 6
    assert Path("models/pretrain/samples.png").is_file()

    teacher = load_teacher("models/pretrain/teacher.safetensors")
    assert teacher.config["num_channels"] == 32
    meta = json.loads(Path("models/pretrain/teacher.json").read_text())
    assert meta["config"]["image_size"] == 16 and meta["steps"] == 6


def test_exported_teacher_feeds_extract(tiny_project):
    _pretrain_params(tiny_project, steps=2)
    assert runner.invoke(app, ["pretrain"]).exit_code == 0
    result = runner.invoke(app, ["extract"])
    assert result.exit_code == 0, result.output
    fp = FeatureCache("cache/features.zarr").spec.to_json()
    assert fp["teacher_sha256"] == sha256_file("models/pretrain/teacher.safetensors")
    assert fp["teacher_config"]["image_size"] == 16  # a 16 px teacher applied to 32 px images


def test_bf16_export_halves_the_file_and_loads_as_float32(tiny_project):
    _pretrain_params(tiny_project, steps=2, samples=0)
    assert runner.invoke(app, ["pretrain"]).exit_code == 0
    full = Path("models/pretrain/teacher.safetensors")
    fp32 = load_teacher(full)
    size32 = full.stat().st_size

    _pretrain_params(tiny_project, steps=2, samples=0, export_dtype="bfloat16")  # same state, re-exported
    result = runner.invoke(app, ["pretrain"])
    assert result.exit_code == 0 and "starting over" not in result.output, result.output
    assert full.stat().st_size < 0.55 * size32
    bf16 = load_teacher(full)
    for (name, a), b in zip(fp32.state_dict().items(), bf16.state_dict().values()):
        assert b.dtype == a.dtype, name
        assert torch.equal(b, a.to(torch.bfloat16).float()), name


def test_brought_teacher_skips_pretraining_and_removes_only_the_export(tiny_project):
    _pretrain_params(tiny_project, steps=2)
    assert runner.invoke(app, ["pretrain"]).exit_code == 0
    tiny_project.write_params()  # tiny_project's own params bring a teacher
    result = runner.invoke(app, ["pretrain"])
    assert result.exit_code == 0 and "skipped" in result.output
    for gone in ("teacher.safetensors", "teacher.json", "samples.png"):
        assert not Path("models/pretrain", gone).exists(), gone  # extract must not pick these up
    assert Path("models/pretrain/state.pt").is_file()  # switching back costs nothing
    assert json.loads(Path("models/pretrain/summary.json").read_text())["skipped"] is True


def test_a_checkpoint_named_as_the_brought_teacher_is_kept(tiny_project):
    _pretrain_params(tiny_project, steps=2)
    assert runner.invoke(app, ["pretrain"]).exit_code == 0
    tiny_project.write_params(teacher={"checkpoint": "models/pretrain/teacher.safetensors"})
    assert runner.invoke(app, ["pretrain"]).exit_code == 0
    assert load_teacher("models/pretrain/teacher.safetensors").config["image_size"] == 16


def test_a_random_teacher_control_is_zero_steps(tiny_project):
    _pretrain_params(tiny_project, steps=0, samples=0)
    result = runner.invoke(app, ["pretrain"])
    assert result.exit_code == 0, result.output
    exported = load_teacher("models/pretrain/teacher.safetensors").state_dict()
    init = new_state(TINY_PRETRAIN, 1e-3, 0.0, seed=0, device=torch.device("cpu")).model.state_dict()
    assert all(torch.equal(exported[k], init[k]) for k in init)  # the seeded initialisation, untrained


def test_a_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_one(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 24, 24, 3), dtype=np.uint8)
    cpu, diffusion = torch.device("cpu"), Diffusion()
    kwargs = dict(batch_size=2, lr=1e-3, warmup=2, ema_decay=0.9, grad_clip=1.0, device=cpu, progress=False)

    def fresh():
        return new_state(TINY_PRETRAIN, 1e-3, 0.0, seed=0, device=cpu), CropSampler(images, 16, seed=0)

    state, sampler = fresh()
    saved = tmp_path / "state.pt"
    pretrain(state, diffusion, sampler, total_steps=5, checkpoint_every=2,
             checkpoint=lambda s: s.step == 2 and torch.save(s.state_dict(sampler, "same"), saved), **kwargs)

    resumed, sampler2 = fresh()
    assert resume_state(resumed, saved, sampler2, max_step=5, identity="other") == "different"
    assert resume_state(resumed, saved, sampler2, max_step=1, identity="same") == "past"
    assert resumed.step == 0
    assert resume_state(resumed, saved, sampler2, max_step=5, identity="same") == "resumed"
    assert resumed.step == 2
    pretrain(resumed, diffusion, sampler2, total_steps=5, **kwargs)
    assert resumed.losses == state.losses
    for (name, a), b in zip(state.ema.state_dict().items(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b), name


def test_changed_settings_never_resume_even_if_killed_before_the_first_checkpoint(tiny_project, monkeypatch):
    import textdiff.pretrain.loop as stage

    _pretrain_params(tiny_project, steps=4)
    assert runner.invoke(app, ["pretrain"]).exit_code == 0

    _pretrain_params(tiny_project, steps=6, lr=5e-4)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(stage, "pretrain", killed)
        assert runner.invoke(app, ["pretrain"]).exit_code == 130
    result = runner.invoke(app, ["pretrain"])  # the old state.pt is still there: it must not be used
    assert result.exit_code == 0, result.output
    assert "resuming" not in result.output and "starting over" in result.output

    tiny_project.write_params(  # the diffusion schedule is part of what was trained, too
        teacher={"checkpoint": "", "steps": [10, 100], "blocks": [0, 3], "diffusion_steps": 500},
        pretrain={"config": TINY_PRETRAIN, "steps": 8, "batch_size": 4, "lr": 5e-4, "warmup": 0,
                  "checkpoint_every": 2, "samples": 0, "sample_steps": 3})
    result = runner.invoke(app, ["pretrain"])
    assert result.exit_code == 0 and "starting over" in result.output, result.output
    meta = json.loads(Path("models/pretrain/teacher.json").read_text())
    assert meta["diffusion_steps"] == 500 and len(meta["images_sha256"]) == 64


def test_trim_dvclive_drops_rows_past_the_resumed_step(tmp_path):
    from textdiff.pretrain.loop import trim_dvclive

    tsv = tmp_path / "plots" / "metrics" / "pretrain" / "loss.tsv"
    tsv.parent.mkdir(parents=True)
    tsv.write_text("timestamp\tstep\tloss\n1\t2\t0.9\n2\t4\t0.8\n3\t6\t0.7\n")
    trim_dvclive(tmp_path, max_step=4)
    assert tsv.read_text() == "timestamp\tstep\tloss\n1\t2\t0.9\n2\t4\t0.8\n"


def test_stale_temporaries_of_a_killed_run_are_removed(tiny_project):
    _pretrain_params(tiny_project, steps=2, samples=0)
    Path("models/pretrain").mkdir(parents=True, exist_ok=True)
    Path("models/pretrain/.state.pt.tmp-999999999").write_bytes(b"torn")  # above any pid_max: no such process
    assert runner.invoke(app, ["pretrain"]).exit_code == 0
    assert not list(Path("models/pretrain").glob(".*.tmp-*"))


def test_zero_steps_after_training_starts_over_rather_than_reusing(tiny_project):
    _pretrain_params(tiny_project, steps=2)
    assert runner.invoke(app, ["pretrain"]).exit_code == 0
    trained = load_teacher("models/pretrain/teacher.safetensors").state_dict()
    _pretrain_params(tiny_project, steps=0, samples=0)
    result = runner.invoke(app, ["pretrain"])
    assert result.exit_code == 0 and "starting over" in result.output
    control = load_teacher("models/pretrain/teacher.safetensors").state_dict()
    assert json.loads(Path("models/pretrain/summary.json").read_text())["steps"] == 0
    assert any(not torch.equal(trained[k], control[k]) for k in trained)


# -- the loop for any budget: EMA warm-up, time box, data sources ------------------------------


def _smooth_images(n: int = 8, size: int = 32, seed: int = 0) -> np.ndarray:
    """Two-colour linear blends at random angles: images whose neighbouring pixels are alike."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        c = rng.uniform(40, 215, (2, 3))
        a = rng.uniform(0, 2 * np.pi)
        w = np.cos(a) * xx + np.sin(a) * yy
        w = (w - w.min()) / (w.max() - w.min())
        out.append((c[0] * (1 - w[..., None]) + c[1] * w[..., None]).astype(np.uint8))
    return np.stack(out)


def _lag1(x: torch.Tensor) -> float:
    """Mean lag-1 horizontal autocorrelation: ~0 for white noise, ~1 for smooth images."""
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    return float(((x[..., :, 1:] * x[..., :, :-1]).sum((-2, -1)) / (x * x).sum((-2, -1)).clamp_min(1e-12)).mean())


def _distance(a: torch.nn.Module | dict, b: torch.nn.Module | dict) -> float:
    a = a.state_dict() if isinstance(a, torch.nn.Module) else a
    b = b.state_dict() if isinstance(b, torch.nn.Module) else b
    return float(sum(((a[k].float() - b[k].float()) ** 2).sum() for k in a)) ** 0.5


def test_the_ema_warm_up_schedule():
    from textdiff.pretrain.loop import ema_decay_at

    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert ema_decay_at(90, 0.999) == pytest.approx(91 / 100)
    assert ema_decay_at(10**6, 0.999) == 0.999
    share = np.prod([ema_decay_at(n, 0.999) for n in range(1800)])  # of the initialisation, after 1,800 steps
    assert share < 1e-20 and 0.999**1800 > 0.16  # what a constant decay kept (issue 11)


def test_a_short_runs_ema_follows_the_weights_and_samples_like_the_data(monkeypatch):
    """After 120 steps at decay 0.999 a constant-decay EMA is 89 % initialisation and samples noise.

    The statistic for "not noise": the lag-1 spatial autocorrelation of the samples. The training
    images are smooth (~0.9), white noise is ~0, and the initialised ADM predicts zero noise, so
    its DDIM samples are the starting noise itself. The warm-up EMA must sit near the trained
    weights and sample clearly structured images; the constant decay (patched in) must not.
    """
    import textdiff.pretrain.loop as stage

    images = _smooth_images()
    diffusion, cpu = Diffusion(), torch.device("cpu")
    results = {}
    for label, schedule in (("warm-up", stage.ema_decay_at), ("constant", lambda n, d: d)):
        monkeypatch.setattr(stage, "ema_decay_at", schedule)
        state = new_state(TINY_PRETRAIN, 2e-3, 0.0, seed=0, device=cpu)
        init = {k: v.clone() for k, v in state.model.state_dict().items()}
        pretrain(state, diffusion, CropSampler(images, 16, seed=0), total_steps=120, batch_size=8, lr=2e-3,
                 warmup=0, ema_decay=0.999, grad_clip=1.0, device=cpu, progress=False)
        gen = torch.Generator().manual_seed(0)
        samples = diffusion.ddim_sample_loop(state.ema.eval(), (8, 3, 16, 16), steps=20, generator=gen, device=cpu)
        results[label] = (_distance(state.ema, state.model) / _distance(state.model, init), _lag1(samples))
    lag_warm, smooth_warm = results["warm-up"]
    lag_const, smooth_const = results["constant"]
    # measured: warm-up 0.08 / 0.23, constant 0.92 / -0.02
    assert lag_warm < 0.3 and lag_const > 0.8, results
    assert smooth_warm > 0.15 and abs(smooth_const) < 0.05, results


def test_a_time_box_stops_checkpoints_exports_and_a_larger_budget_resumes(tiny_project):
    _pretrain_params(tiny_project, steps=50, samples=0, max_minutes=0.0001)  # 6 ms: one step, then stop
    first = runner.invoke(app, ["pretrain"])
    assert first.exit_code == 0, first.output
    assert "stopped by pretrain.max_minutes=0.0001 before pretrain.steps=50" in first.output
    summary = json.loads(Path("models/pretrain/summary.json").read_text())
    done = summary["steps"]
    assert summary["stopped_by"] == "max_minutes" and 1 <= done < 50
    assert load_teacher("models/pretrain/teacher.safetensors").config["image_size"] == 16  # exported
    assert json.loads(Path("models/pretrain/teacher.json").read_text())["steps"] == done

    _pretrain_params(tiny_project, steps=done + 2, samples=0)  # no time box now; the same run goes on
    second = runner.invoke(app, ["pretrain"])
    assert second.exit_code == 0, second.output
    assert f"resuming at step {done}" in second.output
    summary = json.loads(Path("models/pretrain/summary.json").read_text())
    assert summary["steps"] == done + 2 and summary["stopped_by"] == "steps"


def test_extra_images_join_the_teacher_data_and_a_bad_folder_is_one_line(tiny_project, tmp_path):
    from PIL import Image

    _pretrain_params(tiny_project, steps=1, samples=0)
    assert runner.invoke(app, ["pretrain"]).exit_code == 0
    plain = json.loads(Path("models/pretrain/state.json").read_text())["images_sha256"]

    extra = tmp_path / "unlabeled"
    extra.mkdir()
    rng = np.random.default_rng(0)
    for k in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(extra / f"slide{k}.png")
    (extra / "notes.txt").write_text("not an image")
    _pretrain_params(tiny_project, steps=1, samples=0, extra_images=str(extra))
    result = runner.invoke(app, ["pretrain"])
    assert result.exit_code == 0, result.output
    assert f"5 train+val images of data/prepared + 2 of {extra}" in result.output
    assert "starting over" in result.output  # other data: the old state is not resumed
    assert json.loads(Path("models/pretrain/state.json").read_text())["images_sha256"] != plain

    _pretrain_params(tiny_project, steps=1, samples=0, extra_images=str(tmp_path / "nowhere"))
    bad = runner.invoke(app, ["pretrain"])
    assert bad.exit_code == 1 and "Traceback" not in bad.output
    assert bad.output.strip() == f"error: {tmp_path / 'nowhere'}: pretrain.extra_images folder not found"


def test_scale_jitter_trains_on_the_source_images_of_data_root(tiny_project):
    _pretrain_params(tiny_project, steps=2, samples=0, scale_jitter=0.3)
    result = runner.invoke(app, ["pretrain"])
    assert result.exit_code == 0, result.output
    assert "5 train+val images at source resolution" in result.output and "zoom x2^+-0.3" in result.output
    identity = json.loads(Path("models/pretrain/state.json").read_text())
    assert identity["working_scales"] == [0.8] * 5  # 40 px sources, 32 px working size


def test_without_dvclive_the_stage_still_trains_and_says_where_the_curve_is(tiny_project, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "dvclive", None)  # `import dvclive` now raises ImportError
    _pretrain_params(tiny_project, steps=2, samples=0)
    result = runner.invoke(app, ["pretrain"])
    assert result.exit_code == 0, result.output
    assert "dvclive is not installed; the loss curve goes to loss.tsv only" in result.output
    assert len(Path("models/pretrain/loss.tsv").read_text().split()) == 1 + 2


def test_a_sharded_export_feeds_extract_and_skipping_removes_every_shard(tiny_project):
    _pretrain_params(tiny_project, steps=1, samples=0, shard_mb=1)
    result = runner.invoke(app, ["pretrain"])
    assert result.exit_code == 0, result.output
    assert "teacher.safetensors.index.json" in result.output
    shards = list(Path("models/pretrain").glob("teacher-*-of-*.safetensors"))
    assert len(shards) >= 3 and not Path("models/pretrain/teacher.safetensors").exists()
    assert runner.invoke(app, ["extract"]).exit_code == 0
    from textdiff.teacher import checkpoint_sha256

    index = "models/pretrain/teacher.safetensors.index.json"
    assert FeatureCache("cache/features.zarr").spec.teacher_sha256 == checkpoint_sha256(index)

    tiny_project.write_params()  # a brought teacher: the sharded export must go entirely
    assert runner.invoke(app, ["pretrain"]).exit_code == 0
    assert not list(Path("models/pretrain").glob("teacher*"))


def test_pretrain_compile_trains_the_same_model_through_torch_compile(monkeypatch):
    """`pretrain.compile` goes through torch.compile (dynamo traces the UNet and the backward). The
    inductor backend needs a minute of C++ compilation on a CPU, so here dynamo hands the traced
    graph to its `eager` backend: the same wiring, and the same losses as the plain loop."""
    import functools

    calls = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: calls.append(model) or
                        real(model, **{**kw, "backend": "eager"}))
    images = np.random.default_rng(0).integers(0, 256, (3, 24, 24, 3), dtype=np.uint8)
    cpu = torch.device("cpu")
    losses = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        state = new_state(TINY_PRETRAIN, 1e-3, 0.0, seed=0, device=cpu)
        pretrain(state, Diffusion(), CropSampler(images, 16, seed=0), 3, 2, 1e-3, 0, 0.9, 1.0, cpu,
                 compile=compiled, progress=False)
        losses[compiled] = state.losses
    assert len(calls) == 1 and functools.reduce(lambda a, b: a and b, [isinstance(c, torch.nn.Module) for c in calls])
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
