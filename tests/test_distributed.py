"""extract under torchrun (gloo, 2 processes on the CPU) builds the same cache, byte for byte, as
one process; a failing job fails with its message."""

import shutil
from pathlib import Path

import numpy as np
import zarr
from conftest import cache_arrays
from typer.testing import CliRunner

from stages.cli import app
from textdiff.runtime.distributed import Ranks

runner = CliRunner()


def test_ranks_deal_batches_round_robin():
    batches = list(range(7))
    shares = [Ranks(r, 3).share(batches) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(shares, [])) == batches and Ranks().share(batches) == batches


def test_a_hand_set_world_size_without_torchrun_s_variables_is_one_line(monkeypatch):
    """Without these checks: a c10d traceback (no MASTER_ADDR) or a wait for a rank that never comes."""
    import pytest
    import torch

    from textdiff.errors import TextDiffError
    from textdiff.runtime.distributed import init_ranks

    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_ranks(torch.device("cpu"))[0] == Ranks()
    cases = [({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not an integer"),
             ({"WORLD_SIZE": "2"}, "RANK is not set"),
             ({"WORLD_SIZE": "2", "RANK": "5"}, "RANK=5 is outside 0..1"),
             ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR is not set"),
             ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "localhost"}, "MASTER_PORT is not set")]
    for env, message in cases:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        with pytest.raises(TextDiffError, match=message):
            init_ranks(torch.device("cpu"))
    assert not torch.distributed.is_initialized()


def test_two_ranks_build_a_cache_bit_identical_to_one_process(tiny_project, monkeypatch):
    """Each rank computes whole batches exactly as one process would. torchrun gives every process
    one thread (OMP_NUM_THREADS=1), and a CPU convolution may sum in another order with another
    thread count (measured here: one float16 ulp on some pixels), so the single process runs with
    one thread too."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tiny_project.write_params(extract={"views": 8, "batch_size": 2, "rotations": 1})
    try:
        single = runner.invoke(app, ["extract"])
    finally:
        torch.set_num_threads(threads)
    assert single.exit_code == 0, single.output
    shutil.move("cache/features.zarr", "cache/single.zarr")

    tiny_project.write_params(extract={"views": 8, "batch_size": 2, "rotations": 1, "nproc": 2})
    result = runner.invoke(app, ["extract"])
    assert result.exit_code == 0, result.output
    assert "running under torchrun with 2 processes" in result.output

    one, two = cache_arrays(Path("cache/single.zarr")), cache_arrays(Path("cache/features.zarr"))
    assert sorted(one) == sorted(two)
    for name in one:
        assert one[name].dtype == two[name].dtype and np.array_equal(one[name], two[name]), name
    attrs = lambda p: {k: v for k, v in zarr.open_group(str(p), mode="r").attrs.items()}  # noqa: E731
    assert attrs("cache/single.zarr") == attrs("cache/features.zarr")  # spec and provenance alike
    assert runner.invoke(app, ["cache", "verify"]).exit_code == 0


def test_a_failing_distributed_extract_is_one_line_and_leaves_no_cache(tiny_project):
    Path(tiny_project.teacher).write_bytes(b"not a checkpoint")
    tiny_project.write_params(extract={"views": 1, "batch_size": 2, "nproc": 2})
    result = runner.invoke(app, ["extract"])
    assert result.exit_code == 1
    assert "under torchrun (2 processes) failed with exit code" in result.output
    assert not Path("cache/features.zarr").exists()


def test_two_ranks_train_what_one_process_trains(tiny_project):
    """DistributedDataParallel over 2 gloo processes, each half of every batch of 4: the same weights
    as one process with batches of 4, up to the order of float sums (the gradients are averaged over
    ranks, the batch Dice's sums all-reduced, the decoder normalises each image on its own)."""
    import torch

    assert runner.invoke(app, ["extract"]).exit_code == 0
    # float32: this is about DDP summing what one process sums; bfloat16 autocast would round each
    # run's different float-sum orders to 8-bit mantissas and hide the comparison in its noise.
    train = {"epochs": 2, "d_model": 16, "heads": 2, "batch_size": 2, "autocast": "float32"}
    tiny_project.write_params(train=train)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = runner.invoke(app, ["train"])
    finally:
        torch.set_num_threads(threads)
    assert single.exit_code == 0, single.output
    one = torch.load("models/classifier/model.pt")
    shutil.rmtree("models/classifier")

    tiny_project.write_params(train={**train, "nproc": 2})
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 0, result.output
    assert "running under torchrun with 2 processes" in result.output
    two = torch.load("models/classifier/model.pt")
    assert sorted(one) == sorted(two)
    # A conv bias right before BatchNorm is invisible (BN removes any per-channel constant): its
    # exact gradient is 0, so it only collects float noise, differently summed in each run.
    invisible = {f"{decoder}.{k}.bias" for decoder in ("decoder", "distance_head") for k in (0, 3)}
    for key in one:
        if key in invisible:
            assert one[key].abs().max() < 1e-3 and two[key].abs().max() < 1e-3
        else:
            torch.testing.assert_close(two[key], one[key], atol=1e-5, rtol=1e-4, msg=key)
    import json

    assert json.loads(Path("metrics/train.json").read_text())["processes"] == 2


def test_a_batch_that_does_not_split_over_the_ranks_is_refused(tiny_project):
    tiny_project.write_params(train={"epochs": 1, "batch_size": 3, "nproc": 2})
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 1 and "must be a multiple of train.nproc" in result.output
    assert "Traceback" not in result.output
