"""Per-nucleus ground truth: reading, checking against the masks, the prepared format, the target."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from textdiff.data.dataset import read_split, read_splits
from textdiff.data.instances import approximate_ids, nucleus_distance, read_instance_map
from textdiff.data.prepare import prepare_dataset
from textdiff.data.prepared import load_prepared, read_manifest
from textdiff.errors import TextDiffError
from textdiff.params import DataParams


def _instances(root):
    return root.parent / f"{root.name}-instances"


def test_read_split_carries_labels_equal_to_the_mask(tiny_monuseg):
    root = tiny_monuseg()
    samples = read_split(root, "train", instances=_instances(root))
    for s in samples:
        assert s.instances.dtype == np.uint16
        assert np.array_equal(s.instances > 0, s.mask > 0)
        assert not s.approximate
    assert all(s.instances is None for s in read_split(root, "train"))


def test_bad_instance_maps_are_refused_in_one_line(tiny_monuseg):
    root = tiny_monuseg()
    inst = _instances(root)
    target = inst / "Train" / "img_train_1.png"
    labels = np.array(Image.open(target))

    shifted = labels.copy()
    shifted[0, :3] = 9  # three pixels labelled where the mask is background
    Image.fromarray(shifted).save(target)
    with pytest.raises(TextDiffError, match=r"img_train_1.png: the instance map's foreground differs from the mask "
                                            r"on 3 pixels \(3 labelled"):
        read_split(root, "train", instances=inst)

    Image.fromarray(labels[:, :-2].copy()).save(target)
    with pytest.raises(TextDiffError, match=r"img_train_1.png: instance map is 38x40 but the mask is 40x40"):
        read_split(root, "train", instances=inst)

    Image.fromarray(np.stack([labels.astype(np.uint8)] * 3, -1)).save(target)
    with pytest.raises(TextDiffError, match="img_train_1.png: instance map has 3 channels"):
        read_split(root, "train", instances=inst)

    Image.fromarray(labels.astype(np.float32)).save(target.with_suffix(".tif"))
    target.unlink()
    target.with_suffix(".tif").rename(target)  # a float TIFF under the png name
    with pytest.raises(TextDiffError, match="non-integer"):
        read_split(root, "train", instances=inst)

    target.unlink()
    with pytest.raises(TextDiffError, match=r"img_train_1.png: no instance map for image img_train_1"):
        read_split(root, "train", instances=inst)

    target.write_bytes(b"")
    with pytest.raises(TextDiffError, match="img_train_1.png: instance map file is empty"):
        read_instance_map(target)


def test_approximate_maps_come_from_the_manifest(tiny_monuseg):
    root = tiny_monuseg()
    inst = _instances(root)
    (inst / "manifest.csv").write_text("id,split,n_instances,source\nimg_val_0,Val,3,APPROX: watershed\n"
                                       "img_val_1,Val,2,xml\n")
    assert approximate_ids(inst) == {"img_val_0"}
    splits = read_splits(root, instances=inst)
    assert [s.approximate for s in splits["val"]] == [True, False]


def test_prepare_keeps_native_labels_and_the_approximate_flags(tiny_monuseg, tmp_path):
    root = tiny_monuseg(size=48)
    inst = _instances(root)
    (inst / "manifest.csv").write_text("id,source\nimg_train_2,APPROX\n")
    out = tmp_path / "prepared"
    prepare_dataset(DataParams(root=str(root), image_size=32, stain="none"), root, out, inst)
    train = load_prepared(out, "train")
    assert train.instances.shape == (3, 48, 48) and train.instances.dtype == np.uint16
    assert train.approximate.tolist() == [False, False, True]
    assert np.array_equal(train.instances > 0, train.native_masks > 0)
    assert read_manifest(out)["instances"]["approximate"] == ["img_train_2"]
    prepare_dataset(DataParams(root=str(root), image_size=32, stain="none"), root, out)
    assert load_prepared(out, "train").instances is None


def test_nucleus_distance_has_one_peak_per_touching_nucleus():
    labels = np.zeros((20, 30), np.uint16)
    labels[2:18, 2:15] = 1
    labels[2:18, 15:28] = 2  # touching along a column
    d = nucleus_distance(labels)
    assert d.max() == pytest.approx(1.0) and d[labels == 0].max() == 0.0
    assert d[labels == 1].max() == pytest.approx(1.0) and d[labels == 2].max() == pytest.approx(1.0)
    assert d[10, 14] < 0.3 and d[10, 15] < 0.3  # low where the two touch
    from skimage.measure import label

    assert label(d > 0.5).max() == 2  # the core keeps them apart; the binary mask would not
