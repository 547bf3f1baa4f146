"""The fast chunk writer stores exactly zarr's bytes, or leaves the write to zarr."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from textdiff.extract.chunk_files import ImageChunkWriter

KEYS = {"name": "default", "configuration": {"separator": "/"}}


def _array(root: Path, name: str, shape, dtype, **kw) -> zarr.Array:
    group = zarr.open_group(str(root), mode="a", zarr_format=3)
    return group.create_array(name, shape=shape, chunks=(1, *shape[1:]), dtype=dtype, fill_value=0,
                              chunk_key_encoding=KEYS, **kw)


def _files(root: Path, name: str) -> dict[str, bytes]:
    base = root / name
    return {str(p.relative_to(base)): p.read_bytes()
            for p in sorted(base.rglob("*")) if p.is_file() and p.name != "zarr.json"}


@pytest.mark.parametrize("dtype", ["float16", "float32", "uint16", "uint8"])
def test_the_fast_path_writes_zarr_s_own_bytes(tmp_path, dtype):
    rng = np.random.default_rng(0)
    shape = (3, 2, 3, 8, 5)
    items = [(rng.standard_normal(shape[1:]) * 40).astype(dtype) for _ in range(3)]
    by_zarr, by_writer = _array(tmp_path, "a", shape, dtype), _array(tmp_path, "b", shape, dtype)
    writer = ImageChunkWriter(by_writer)
    assert writer.fast
    for i in (2, 0):  # out of order, one item left unwritten
        by_zarr[i] = items[i]
        writer(i, items[i])
    assert _files(tmp_path, "b") == _files(tmp_path, "a") and len(_files(tmp_path, "a")) == 2
    reread = zarr.open_group(str(tmp_path), mode="r")["b"]
    np.testing.assert_array_equal(reread[2], items[2])
    np.testing.assert_array_equal(reread[1], np.zeros(shape[1:], dtype))  # never written: the fill value


def test_an_all_zero_item_follows_zarr_s_rule_and_removes_a_stale_chunk(tmp_path):
    array = _array(tmp_path, "a", (2, 4, 4), "float16")
    writer = ImageChunkWriter(array)
    writer(0, np.ones((4, 4), np.float16))
    assert (tmp_path / "a" / "c" / "0" / "0" / "0").is_file()
    writer(0, np.zeros((4, 4), np.float16))  # zarr stores no chunk for the fill value, and drops the old one
    assert not (tmp_path / "a" / "c" / "0" / "0" / "0").exists()
    np.testing.assert_array_equal(array[0], np.zeros((4, 4), np.float16))


def test_an_all_zero_item_is_stored_when_the_array_keeps_empty_chunks(tmp_path):
    """The cache's arrays keep every chunk (an image without nuclei has an all-zero mask): the fast
    path then writes the zero item too, with the bytes zarr itself writes under that setting."""
    from textdiff.cache.store import keeping_empty_chunks

    with keeping_empty_chunks():
        by_zarr, by_writer = _array(tmp_path, "a", (2, 4, 4), "uint8"), _array(tmp_path, "b", (2, 4, 4), "uint8")
        writer = ImageChunkWriter(by_writer)
        assert writer.fast
        by_zarr[1] = np.zeros((4, 4), np.uint8)
        writer(1, np.zeros((4, 4), np.uint8))
    assert _files(tmp_path, "b") == _files(tmp_path, "a") and list(_files(tmp_path, "b")) == ["c/1/0/0"]


def test_other_layouts_are_left_to_zarr(tmp_path):
    plain = _array(tmp_path, "raw", (2, 4, 4), "float16", compressors=None)
    group = zarr.open_group(str(tmp_path), mode="a", zarr_format=3)
    split = group.create_array("split", shape=(2, 4, 4), chunks=(1, 2, 4), dtype="float16", fill_value=0)
    for array in (plain, split):
        writer = ImageChunkWriter(array)
        assert not writer.fast
        writer(1, np.full((4, 4), 3, np.float16))
        np.testing.assert_array_equal(array[1], np.full((4, 4), 3, np.float16))


def test_a_wrong_shape_or_index_is_refused(tmp_path):
    writer = ImageChunkWriter(_array(tmp_path, "a", (2, 4, 4), "float16"))
    with pytest.raises(ValueError, match="shape"):
        writer(0, np.ones((4, 5), np.float16))
    with pytest.raises(IndexError):
        writer(2, np.ones((4, 4), np.float16))


def test_read_only_arrays_and_non_zero_fill_values_are_left_to_zarr(tmp_path):
    _array(tmp_path, "a", (2, 4), "float32")
    group = zarr.open_group(str(tmp_path), mode="a", zarr_format=3)
    negative_zero = group.create_array("z", shape=(2, 4), chunks=(1, 4), dtype="float32", fill_value=-0.0,
                                       chunk_key_encoding=KEYS)
    assert not ImageChunkWriter(negative_zero).fast  # zarr compares fill bits: -0.0 is not "all zero bits"
    read_only = zarr.open_group(str(tmp_path), mode="r")["a"]
    writer = ImageChunkWriter(read_only)
    assert not writer.fast
    with pytest.raises(Exception):  # noqa: B017 - zarr's own refusal, not a file written behind its back
        writer(0, np.ones(4, np.float32))
    assert not (tmp_path / "a" / "c").exists()


def test_negative_index_and_no_partial_file_left(tmp_path):
    array = _array(tmp_path, "a", (3, 4), "float16")
    ImageChunkWriter(array)(-1, np.ones(4, np.float16))
    np.testing.assert_array_equal(array[2], np.ones(4, np.float16))
    assert [p.name for p in (tmp_path / "a" / "c").rglob("*") if p.is_file()] == ["0"]  # c/2/0, no .partial
