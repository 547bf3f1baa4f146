"""The dataset reader: the real MoNuSeg split, and every way a dataset can be broken."""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from textdiff.data import dataset, images, prepared
from textdiff.data.dataset import SPLITS, Sample, read_split
from textdiff.data.images import read_image
from textdiff.data.prepared import load_prepared, write_prepared
from textdiff.data.reports import read_reports
from textdiff.data.resize import resize_sample
from textdiff.errors import TextDiffError

REAL_COUNTS = {"train": 24, "val": 6, "test": 14}


@contextmanager
def raises_one_line(*needles: str):
    """Expect a TextDiffError whose message is one line containing every needle."""
    with pytest.raises(TextDiffError) as info:
        yield info
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


# ---------------------------------------------------------------------------------------------
# the real data


@pytest.fixture(scope="module")
def real_splits(monuseg_root: Path) -> dict[str, list[Sample]]:
    return {split: read_split(monuseg_root, split) for split in SPLITS}


def test_real_counts_shapes_and_masks(real_splits, monuseg_root):
    assert {k: len(v) for k, v in real_splits.items()} == REAL_COUNTS
    for split, samples in real_splits.items():
        ids = [s.id for s in samples]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        for s in samples:
            assert s.image.shape == (1000, 1000, 3) and s.image.dtype == np.uint8
            assert s.mask.shape == (1000, 1000) and s.mask.dtype == np.uint8
            assert set(np.unique(s.mask)) == {0, 1}
            assert isinstance(s.text, str) and s.text.strip() == s.text and s.text
            assert s.image_path.suffix == (".tif" if split == "test" else ".png")
            assert s.mask_path == monuseg_root / dataset.FOLDERS[split] / "labelcol" / f"{s.id}.png"
            assert len(s.image_sha256) == 64 and len(s.mask_sha256) == 64
    all_ids = [s.id for samples in real_splits.values() for s in samples]
    assert len(set(all_ids)) == len(all_ids)  # no image in two splits


def test_real_ids_match_workbooks(real_splits, monuseg_root):
    for split, samples in real_splits.items():
        reports = read_reports(monuseg_root / dataset.FOLDERS[split] / dataset.WORKBOOKS[split])
        assert sorted(reports) == [s.id for s in samples]
        assert all(reports[s.id] == s.text for s in samples)


def test_real_resize_keeps_masks_binary(real_splits):
    s = resize_sample(real_splits["val"][0], 256)
    assert s.image.shape == (256, 256, 3) and s.image.dtype == np.uint8
    assert s.mask.shape == (256, 256) and set(np.unique(s.mask)) == {0, 1}
    assert s.text == real_splits["val"][0].text


# ---------------------------------------------------------------------------------------------
# the synthetic dataset: the good case


def test_tiny_reads(tiny_monuseg):
    root = tiny_monuseg()
    samples = read_split(root, "train")
    assert [s.id for s in samples] == ["img_train_0", "img_train_1", "img_train_2"]
    assert samples[0].image.shape == (40, 40, 3) and set(np.unique(samples[0].mask)) == {0, 1}
    test = read_split(root, "test")
    assert all(s.image_path.suffix == ".tif" for s in test)


def test_grayscale_and_rgba_images_become_rgb(tiny_monuseg):
    root = tiny_monuseg()
    img = root / "Train_Folder" / "img"
    rgb = np.asarray(Image.open(img / "img_train_0.png"))
    Image.fromarray(rgb[..., 0], "L").save(img / "img_train_0.png")
    rgba = np.dstack([np.asarray(Image.open(img / "img_train_1.png")), np.full((40, 40), 7, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(img / "img_train_1.png")
    samples = read_split(root, "train")
    gray, four = samples[0].image, samples[1].image
    assert gray.shape == (40, 40, 3) and np.array_equal(gray[..., 0], gray[..., 2])
    assert np.array_equal(four, rgba[..., :3])


def test_masks_in_zero_one_are_accepted(tiny_monuseg):
    root = tiny_monuseg()
    path = root / "Train_Folder" / "labelcol" / "img_train_0.png"
    m = np.asarray(Image.open(path)) // 255
    Image.fromarray(m.astype(np.uint8), "L").save(path)
    assert np.array_equal(read_split(root, "train")[0].mask, m)


def test_workbook_variants_are_tolerated(tiny_monuseg, xlsx_writer):
    """Extra columns, a blank first row, odd header spacing, stems or .tif names, padded text,
    agreeing duplicates and rows for images that do not exist are all fine."""
    root = tiny_monuseg()
    book = root / "Train_Folder" / "Train_text.xlsx"
    xlsx_writer(
        book,
        [
            (None, None, None),
            ("#", " image ", "DESCRIPTION"),
            (1, "img_train_0.png", "  The nuclei  are\nevenly distributed. "),
            (2, "img_train_1", "Two."),
            (3, "img_train_2.tif", "Three."),
            (4, "img_train_2.png", "Three."),
            (5, "not_an_image.png", "Ignored."),
            (6, None, None),
        ],
        header=None,
    )
    texts = [s.text for s in read_split(root, "train")]
    assert texts == ["The nuclei are evenly distributed.", "Two.", "Three."]


# ---------------------------------------------------------------------------------------------
# the synthetic dataset: broken on purpose


def test_missing_root(tmp_path):
    with raises_one_line(str(tmp_path / "nowhere"), "not found"):
        read_split(tmp_path / "nowhere", "train")


def test_missing_split_folder(tiny_monuseg):
    root = tiny_monuseg(counts={"train": 2})
    with raises_one_line("Val_Folder"):
        read_split(root, "val")


def test_missing_img_folder(tiny_monuseg):
    root = tiny_monuseg()
    shutil.rmtree(root / "Val_Folder" / "img")
    with raises_one_line(str(root / "Val_Folder" / "img")):
        read_split(root, "val")


def test_empty_split(tiny_monuseg):
    root = tiny_monuseg(counts={"train": 2, "val": 0, "test": 1})
    (root / "Val_Folder" / "img" / "notes.txt").write_text("not an image")
    with raises_one_line(str(root / "Val_Folder" / "img"), "no images"):
        read_split(root, "val")


@pytest.mark.parametrize(
    "name, breaker",
    [
        ("garbage", lambda p: p.write_bytes(b"this is not an image at all" * 10)),
        ("truncated", lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])),
        ("empty", lambda p: p.write_bytes(b"")),
    ],
)
def test_corrupt_image(tiny_monuseg, name, breaker):
    root = tiny_monuseg()
    path = root / "Train_Folder" / "img" / "img_train_1.png"
    breaker(path)
    with raises_one_line(str(path)):
        read_split(root, "train")


def test_corrupt_tif_image(tiny_monuseg):
    root = tiny_monuseg()
    path = root / "Test_Folder" / "img" / "img_test_0.tif"
    path.write_bytes(path.read_bytes()[:300])
    with raises_one_line(str(path)):
        read_split(root, "test")


def test_unsupported_image_mode(tiny_monuseg):
    root = tiny_monuseg()
    path = root / "Train_Folder" / "img" / "img_train_0.png"
    Image.fromarray(np.full((40, 40), 4000, np.uint16)).save(path)
    with raises_one_line(str(path), "mode"):
        read_split(root, "train")


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_sixteen_bit_colour_images_are_refused_not_truncated(tmp_path, suffix):
    """Pillow would open these as 8-bit RGB holding only the high byte (a 12-bit scan: all < 16)."""
    import cv2

    deep = np.random.default_rng(0).integers(0, 4096, (24, 24, 3)).astype(np.uint16)
    path = tmp_path / f"deep{suffix}"
    cv2.imwrite(str(path), deep)
    with raises_one_line(str(path), "16-bit"):
        read_image(path)
    cv2.imwrite(str(path), (deep >> 4).astype(np.uint8))  # the same picture at 8 bits is read
    assert read_image(path)[0].shape == (24, 24, 3)


def test_missing_mask(tiny_monuseg):
    root = tiny_monuseg()
    (root / "Train_Folder" / "labelcol" / "img_train_2.png").unlink()
    with raises_one_line("img_train_2.png", "no mask"):
        read_split(root, "train")


def test_corrupt_mask(tiny_monuseg):
    root = tiny_monuseg()
    path = root / "Train_Folder" / "labelcol" / "img_train_0.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with raises_one_line(str(path)):
        read_split(root, "train")


def test_size_mismatch(tiny_monuseg):
    root = tiny_monuseg()
    path = root / "Train_Folder" / "labelcol" / "img_train_1.png"
    Image.fromarray(np.zeros((30, 20), np.uint8), "L").save(path)
    with raises_one_line(str(path), "20x30", "40x40"):
        read_split(root, "train")


def test_non_binary_mask(tiny_monuseg):
    root = tiny_monuseg()
    path = root / "Train_Folder" / "labelcol" / "img_train_0.png"
    m = np.asarray(Image.open(path)).copy()
    m[:5, :5] = 128
    Image.fromarray(m, "L").save(path)
    with raises_one_line(str(path), "not binary", "0, 128, 255"):
        read_split(root, "train")


def test_colour_mask(tiny_monuseg):
    root = tiny_monuseg()
    path = root / "Train_Folder" / "labelcol" / "img_train_0.png"
    m = np.zeros((40, 40, 3), np.uint8)
    m[..., 0] = 255
    Image.fromarray(m, "RGB").save(path)
    with raises_one_line(str(path), "colour"):
        read_split(root, "train")


def test_missing_workbook(tiny_monuseg):
    root = tiny_monuseg()
    book = root / "Val_Folder" / "Val_text.xlsx"
    book.unlink()
    with raises_one_line(str(book), "not found"):
        read_split(root, "val")


def test_corrupt_workbook(tiny_monuseg):
    root = tiny_monuseg()
    book = root / "Val_Folder" / "Val_text.xlsx"
    book.write_bytes(b"PK\x03\x04 not really a zip")
    with raises_one_line(str(book)):
        read_split(root, "val")


def test_workbook_without_columns(tiny_monuseg, xlsx_writer):
    root = tiny_monuseg()
    book = root / "Train_Folder" / "Train_text.xlsx"
    xlsx_writer(book, [("img_train_0.png", "x")], header=("Name", "Text"))
    with raises_one_line(str(book), "'Image'", "'Description'", "'Name', 'Text'"):
        read_split(root, "train")


def test_missing_report_row(tiny_monuseg, xlsx_writer):
    root = tiny_monuseg()
    book = root / "Train_Folder" / "Train_text.xlsx"
    xlsx_writer(book, [("img_train_0.png", "a."), ("img_train_2.png", "c.")])
    with raises_one_line(str(book), "img_train_1"):
        read_split(root, "train")


@pytest.mark.parametrize("text", [None, "", "   \n "])
def test_empty_report(tiny_monuseg, xlsx_writer, text):
    root = tiny_monuseg()
    book = root / "Train_Folder" / "Train_text.xlsx"
    xlsx_writer(book, [("img_train_0.png", "a."), ("img_train_1.png", text), ("img_train_2.png", "c.")])
    with raises_one_line(str(book), "img_train_1", "empty"):
        read_split(root, "train")


def test_conflicting_duplicate_reports(tiny_monuseg, xlsx_writer):
    root = tiny_monuseg()
    book = root / "Train_Folder" / "Train_text.xlsx"
    rows = [("img_train_0.png", "a."), ("img_train_1.png", "b."), ("img_train_2.png", "c."), ("img_train_1.png", "B!")]
    xlsx_writer(book, rows)
    with raises_one_line(str(book), "img_train_1", "rows 3 and 5"):
        read_split(root, "train")


def test_same_image_in_two_splits(tiny_monuseg, xlsx_writer):
    root = tiny_monuseg()
    for sub in ("img", "labelcol"):
        src = root / "Train_Folder" / sub / "img_train_0.png"
        shutil.copy(src, root / "Val_Folder" / sub / "img_train_0.png")
    xlsx_writer(root / "Val_Folder" / "Val_text.xlsx",
                   [("img_val_0.png", "a."), ("img_val_1.png", "b."), ("img_train_0.png", "c.")])
    with raises_one_line("img_train_0", "train", "val"):
        dataset.read_splits(root, ("train", "val"))


# ---------------------------------------------------------------------------------------------
# the prepared format


def _prepared_inputs(root: Path, size: int = 16) -> dict[str, list[Sample]]:
    return {split: [resize_sample(s, size) for s in read_split(root, split)] for split in SPLITS}


def test_write_and_load_prepared(tiny_monuseg, tmp_path):
    root = tiny_monuseg()
    out = tmp_path / "data" / "prepared"
    write_prepared(out, _prepared_inputs(root), {"image_size": 16, "source_root": str(root)})
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "test.npz", "train.npz", "val.npz"]
    assert [p.name for p in out.parent.iterdir()] == ["prepared"]  # no temp dir left
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["image_size"] == 16 and manifest["source_root"] == str(root.resolve())
    assert manifest["splits"]["train"]["count"] == 3
    entry = manifest["splits"]["test"]["files"]["img_test_0"]
    assert entry["image"] == "Test_Folder/img/img_test_0.tif" and len(entry["mask_sha256"]) == 64
    train = load_prepared(out, "train")
    assert train.images.shape == (3, 16, 16, 3) and train.images.dtype == np.uint8
    assert train.masks.shape == (3, 16, 16) and set(np.unique(train.masks)) <= {0, 1}
    assert train.ids == ["img_train_0", "img_train_1", "img_train_2"] and len(train) == 3
    assert train.texts[0] == "The nuclei are evenly distributed." and train.image_size == 16
    with np.load(out / "train.npz", allow_pickle=False) as npz:  # plain arrays, no pickles
        assert npz["ids"].dtype.kind == "U" and npz["texts"].dtype.kind == "U"


def test_write_prepared_is_deterministic(tiny_monuseg, tmp_path):
    root = tiny_monuseg()
    inputs = _prepared_inputs(root)
    a, b = tmp_path / "a", tmp_path / "b"
    write_prepared(a, inputs, {"image_size": 16, "source_root": str(root)})
    write_prepared(b, inputs, {"image_size": 16, "source_root": str(root)})
    for name in ("train.npz", "manifest.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_failed_write_leaves_old_output(tiny_monuseg, tmp_path, monkeypatch):
    root = tiny_monuseg()
    out = tmp_path / "prepared"
    write_prepared(out, _prepared_inputs(root), {"image_size": 16, "source_root": str(root)})
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    calls = []

    def failing_save(path, arrays):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(path, arrays)

    real_save = prepared._save_npz
    monkeypatch.setattr(prepared, "_save_npz", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_prepared(out, _prepared_inputs(root, 8), {"image_size": 8, "source_root": str(root)})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # and with no previous output, nothing at all is left
    calls.clear()
    with pytest.raises(OSError):
        write_prepared(tmp_path / "fresh", _prepared_inputs(root, 8), {"image_size": 8, "source_root": str(root)})
    assert not (tmp_path / "fresh").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_write_prepared_refuses_unresized_samples(tiny_monuseg, tmp_path):
    root = tiny_monuseg()
    splits = {"train": read_split(root, "train")}
    with pytest.raises(ValueError):
        write_prepared(tmp_path / "p", splits, {"image_size": 16, "source_root": str(root)})
    assert not (tmp_path / "p").exists() and sorted(os.listdir(tmp_path)) == [root.name, f"{root.name}-instances"]


def test_load_prepared_errors(tiny_monuseg, tmp_path):
    out = tmp_path / "prepared"
    with raises_one_line(str(out), "textdiff prepare"):
        load_prepared(out, "train")
    root = tiny_monuseg()
    write_prepared(out, _prepared_inputs(root), {"image_size": 16, "source_root": str(root)})
    (out / "val.npz").unlink()
    with raises_one_line(str(out / "val.npz"), "textdiff prepare"):
        load_prepared(out, "val")
    (out / "test.npz").write_bytes(b"junk")
    with raises_one_line(str(out / "test.npz")):
        load_prepared(out, "test")
    (out / "manifest.json").unlink()
    with raises_one_line("manifest", "textdiff prepare"):
        load_prepared(out, "train")


def test_write_prepared_removes_stale_temp_dirs_of_dead_runs(tiny_monuseg, tmp_path):
    root = tiny_monuseg()
    dead = tmp_path / ".prepared.tmp-999999999"  # no such process
    alive = tmp_path / f".prepared.tmp-{os.getppid()}"  # a live process: maybe another prepare
    dead.mkdir()
    alive.mkdir()
    write_prepared(tmp_path / "prepared", _prepared_inputs(root), {"image_size": 16, "source_root": str(root)})
    assert not dead.exists() and alive.exists()


def test_tiff_that_pillow_cannot_decode_falls_back_to_tifffile(tiny_monuseg, monkeypatch):
    root = tiny_monuseg()
    expected = [s.image for s in read_split(root, "test")]

    def refuse(*args, **kwargs):
        raise OSError("unsupported compression")

    monkeypatch.setattr(images.Image, "open", refuse)
    monkeypatch.setattr(dataset, "read_mask", lambda path: (np.zeros((40, 40), np.uint8), ""))  # masks are PNG
    got = [s.image for s in read_split(root, "test")]
    assert all(np.array_equal(a, b) for a, b in zip(expected, got))
