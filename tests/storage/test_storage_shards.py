"""Packing a class-folder tree (with bad files) into webdataset shards + index, on every backend; reading back."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from storage.images import center_crop, decode_image
from storage.shards import open_dataset, pack_image_folder, sanitize_key
from storage.synthetic import make_shapes_dataset
from storage.urls import join, url_to_fs


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory):
    """3 classes × 6 generated images, plus one bad file per kind and a non-image file that must be ignored."""
    root = tmp_path_factory.mktemp("tree") / "train"
    make_shapes_dataset(str(root), num_classes=3, per_class=6, size=40, fmt="jpg")
    (root / "00_circle" / "empty.JPEG").write_bytes(b"")
    (root / "01_square" / "html.JPEG").write_bytes(b"<html>moved</html>")
    good = (root / "02_triangle" / "triangle_00000.jpg").read_bytes()
    (root / "02_triangle" / "cut.jpg").write_bytes(good[: len(good) // 2])
    buf = io.BytesIO()
    Image.open(io.BytesIO(good)).convert("CMYK").save(buf, format="JPEG")
    (root / "02_triangle" / "cmyk.jpg").write_bytes(buf.getvalue())
    (root / "README.txt").write_text("not a sample")
    (root / "00_circle" / "notes.txt").write_text("not a sample either")
    return str(root)


def test_pack_and_read_back_all_backends(image_tree, backend_url):
    dst = join(backend_url, "data", "shapes")
    info = pack_image_folder(image_tree, dst, shard_bytes=20_000, progress=False)
    assert info.num_samples == 18 + 4 and info.num_valid == 19 and info.num_classes == 3
    assert info.class_names == ["00_circle", "01_square", "02_triangle"] and len(info.shards) > 1

    ds = open_dataset(dst)
    assert ds.fingerprint == info.fingerprint and len(ds) == 22
    reasons = dict(zip(ds.index["source"], ds.index["reason"]))
    assert reasons["00_circle/empty.JPEG"] == "empty file (0 bytes)"
    assert reasons["01_square/html.JPEG"].startswith("not an image (text")
    assert reasons["02_triangle/cut.jpg"] == "truncated image data"
    assert reasons["02_triangle/cmyk.jpg"] == ""  # converted, valid
    labels = dict(zip(ds.index["source"], ds.index["label"]))
    assert labels["01_square/square_00003.jpg"] == 1 and labels["02_triangle/cmyk.jpg"] == 2

    images, got_labels, valid = ds.read_range(0, 22, 24)
    assert images.shape == (22, 24, 24, 3) and valid.sum() == 19
    assert (images[~valid] == 0).all()
    np.testing.assert_array_equal(got_labels, ds.index["label"])
    for i in np.flatnonzero(valid)[:5]:
        src = open(join(image_tree, ds.index["source"][i]), "rb").read()
        np.testing.assert_array_equal(images[i], center_crop(decode_image(src), 24))
    # The sample order is a seeded permutation: units of consecutive rows mix classes.
    assert not np.all(np.diff(ds.index["label"]) >= 0)


def test_pack_is_idempotent_and_fingerprint_follows_content(image_tree, tmp_path):
    a = pack_image_folder(image_tree, str(tmp_path / "a"), progress=False)
    again = pack_image_folder(image_tree, str(tmp_path / "a"), progress=False)
    other_layout = pack_image_folder(image_tree, str(tmp_path / "b"), shard_bytes=5_000, progress=False)
    reordered = pack_image_folder(image_tree, str(tmp_path / "c"), seed=1, progress=False)
    assert a.fingerprint == again.fingerprint == other_layout.fingerprint
    assert reordered.fingerprint != a.fingerprint


def test_shards_are_webdataset_tars_and_repack_from_tars(image_tree, tmp_path):
    info = pack_image_folder(image_tree, str(tmp_path / "p"), shard_bytes=30_000, progress=False)
    with tarfile.open(tmp_path / "p" / info.shards[0]) as tf:
        names = tf.getnames()
    assert names[0].endswith(".jpg") and names[1] == names[0].rsplit(".", 1)[0] + ".cls"
    # webdataset tars as input (here: our own shards)
    again = pack_image_folder(str(tmp_path / "p"), str(tmp_path / "q"), progress=False)
    assert again.num_samples == info.num_valid == again.num_valid
    images, labels, valid = open_dataset(str(tmp_path / "q")).read_range(0, again.num_samples, 16)
    assert valid.all() and set(labels.tolist()) == {0, 1, 2}


def test_hostile_member_names_are_sanitised(tmp_path):
    good = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(good, format="PNG")
    tar_path = tmp_path / "in" / "evil.tar"
    tar_path.parent.mkdir()
    with tarfile.open(tar_path, "w") as tf:
        for name, data in (("../../etc/passwd.png", good.getvalue()), ("../../etc/passwd.cls", b"3")):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tf.addfile(member, io.BytesIO(data))
    info = pack_image_folder(str(tmp_path / "in"), str(tmp_path / "out"), progress=False)
    ds = open_dataset(str(tmp_path / "out"))
    key = ds.index["key"][0]
    assert "/" not in key and ".." not in key and ds.labels[0] == 3 and info.num_classes == 4
    fs, root = url_to_fs(str(tmp_path))
    assert not any("passwd" in p for p in fs.find(root) if not p.endswith(".tar") and "out" not in p)
    assert sanitize_key("a/b/../c d.JPEG") == "a_b_c_d_JPEG"


def test_empty_source_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        pack_image_folder(str(tmp_path / "empty"), str(tmp_path / "out"), progress=False)
    with pytest.raises(FileNotFoundError, match="pack_image_folder"):
        open_dataset(str(tmp_path / "nowhere"))
