"""Datasets: Omniglot loading and merging, rotations, the split rule, IDX and ImageFolder."""

from __future__ import annotations

import gzip
import io
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from server.imaging import Preprocessor, decode_image
from tests.training.glyphs import glyph
from training.data import (
    ImageSet,
    load_fashion_mnist,
    load_image_folder,
    load_omniglot,
    omniglot_preprocess,
    read_idx,
    split_classes,
)


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def write_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def test_omniglot_background_sets(omniglot: ImageSet) -> None:
    assert len(omniglot) == 4840 and len(omniglot.classes) == 242
    counts = Counter(omniglot.superclasses)
    assert len(counts) == 8 and counts["Greek"] == 24 and counts["Latin"] == 26
    assert set(np.bincount(omniglot.labels)) == {20}
    assert set(omniglot.drawers.tolist()) == set(range(1, 21))
    assert omniglot.images.shape[1:] == (1, 28, 28)
    ink = float(omniglot.batch(np.arange(200), np.zeros(200, int)).mean())
    assert 0.03 < ink < 0.2  # inverted: mostly 0 background, strokes near 1


def test_omniglot_pixels_are_the_servers(omniglot: ImageSet) -> None:
    from training.data.omniglot import default_sources

    source = default_sources()[0]
    with zipfile.ZipFile(source) as zf:
        name = next(n for n in sorted(zf.namelist()) if n.endswith(".png"))
        data = zf.read(name)
    alphabet, char = name.split("/")[-3:-1]
    cls = omniglot.classes.index(f"{alphabet}/{char}")
    first = omniglot.indices_of(cls)[0]
    served = Preprocessor(omniglot.preprocess).preprocess_bytes([data])
    ours = omniglot.normalise(omniglot.batch([first], [0])).numpy()
    np.testing.assert_array_equal(ours, served)


def test_merge_zip_and_folder(tmp_path: Path) -> None:
    a = {
        f"set1/Alpha/character0{c}/00{c}_0{d}.png": png(glyph(c, (d, 0)))
        for c in (1, 2)
        for d in (1, 2)
    }
    b = {f"set2/Alpha/character01/001_0{d}.png": png(glyph(1, (d, 0))) for d in (1, 2)}
    b["set2/Beta/character01/009_01.png"] = png(glyph(9))
    folder = tmp_path / "set2"
    for name, data in b.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    ds = load_omniglot([write_zip(tmp_path / "a.zip", a), folder], size=20)
    assert ds.classes == ["Alpha/character01", "Alpha/character02", "Beta/character01"]
    assert ds.superclasses == ["Alpha", "Alpha", "Beta"]
    assert len(ds) == 5 and ds.drawers.tolist() == [1, 2, 1, 2, 1]
    assert ds.size == (20, 20)
    bad = {"set3/Alpha/character01/001_01.png": png(glyph(5))}
    with pytest.raises(ValueError, match="differs between sources"):
        load_omniglot([tmp_path / "a.zip", write_zip(tmp_path / "bad.zip", bad)])


def test_missing_sources_say_where(tmp_path: Path) -> None:
    from training.data.omniglot import default_sources

    with pytest.raises(FileNotFoundError, match="images_background_small1"):
        default_sources(tmp_path)


def test_rotations_are_extra_classes(glyphs: ImageSet) -> None:
    rot = glyphs.with_rotations([0, 1, 2, 3])
    assert rot.num_classes == 4 * len(glyphs.classes)
    cls = 4 * 5 + 3
    assert rot.base_class(cls) == 5 and rot.rotation(cls) == 3
    assert rot.superclass_of(cls) == f"{glyphs.superclasses[5]}/rot3"
    i = int(rot.indices_of(cls)[0])
    turned = rot.batch([i], [3])[0, 0].numpy()
    np.testing.assert_array_equal(turned, np.rot90(1 - glyphs.images[i, 0] / np.float32(255), 3))


def test_mirrored_views_are_extra_classes(glyphs: ImageSet) -> None:
    from training.cli_args import _view_codes

    codes = _view_codes(no_rotations=False, mirror=True)
    assert codes == [0, 1, 2, 3, 4, 5, 6, 7] and _view_codes(True, True) == [0, 4]
    eight = glyphs.with_rotations(codes)
    assert eight.num_classes == 8 * len(glyphs.classes)
    cls = 8 * 2 + 5  # base class 2, mirrored then one quarter turn
    assert eight.base_class(cls) == 2 and eight.rotation(cls) == 5
    assert eight.superclass_of(cls) == f"{glyphs.superclasses[2]}/mir1"
    assert eight.class_name(8 * 2 + 1) == f"{glyphs.classes[2]}/rot1"
    i = int(eight.indices_of(cls)[0])
    page = 1 - glyphs.images[i, 0] / np.float32(255)
    got = eight.batch([i, i], [4, 5])[:, 0].numpy()
    np.testing.assert_array_equal(got[0], page[:, ::-1])
    np.testing.assert_array_equal(got[1], np.rot90(page[:, ::-1], 1))
    with pytest.raises(ValueError, match="codes 0..7"):
        glyphs.with_rotations([0, 8])


def test_split_is_seeded_disjoint_and_per_alphabet(omniglot: ImageSet) -> None:
    train, val = split_classes(omniglot, 0.2, seed=0)
    again, val2 = split_classes(omniglot, 0.2, seed=0)
    assert val.classes == val2.classes and train.classes == again.classes
    assert not set(train.classes) & set(val.classes)
    assert len(train.classes) + len(val.classes) == 242 and len(train) + len(val) == 4840
    per = Counter(val.superclasses)
    assert per["Japanese_(katakana)"] == round(0.2 * 47) and per["Tagalog"] == round(0.2 * 17)
    assert split_classes(omniglot, 0.2, seed=1)[1].classes != val.classes
    rest, whole = split_classes(omniglot, 0.2, seed=0, by="superclasses")
    assert not set(whole.superclasses) & set(rest.superclasses)
    assert len(whole.classes) >= 0.2 * 242
    assert len(split_classes(omniglot, 0.0)[1].classes) == 0


def idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_idx(tmp_path: Path, gz: bool) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 28, 28)).astype(np.uint8)
    labels = np.arange(12) % 10
    for stem, arr in (("t10k-images-idx3-ubyte", images), ("t10k-labels-idx1-ubyte", labels)):
        data = idx_bytes(arr)
        (tmp_path / (stem + (".gz" if gz else ""))).write_bytes(gzip.compress(data) if gz else data)
    suffix = ".gz" if gz else ""
    np.testing.assert_array_equal(read_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}"), labels)
    ds = load_fashion_mnist(tmp_path, "test")
    np.testing.assert_array_equal(ds.images[:, 0], images)
    assert ds.classes[9] == "Ankle boot" and ds.superclass_of(9) == "footwear"
    small = load_fashion_mnist(tmp_path, "test", size=14)
    assert small.images.shape == (12, 1, 14, 14)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="unsigned-byte IDX"):
        read_idx(tmp_path / "bad")


def test_image_folder_with_superclasses(tmp_path: Path) -> None:
    for sup, cls, n in (("a", "x", 2), ("a", "y", 3), ("b", "z", 1)):
        (tmp_path / sup / cls).mkdir(parents=True)
        for i in range(n):
            glyph(i).convert("RGB").save(tmp_path / sup / cls / f"{i}.jpg")
    ds = load_image_folder(tmp_path, superclasses=True)
    assert ds.classes == ["a/x", "a/y", "b/z"] and ds.superclasses == ["a", "a", "b"]
    assert np.bincount(ds.labels).tolist() == [2, 3, 1] and ds.images.shape[1:] == (3, 84, 84)
    one = decode_image((tmp_path / "a/x/0.jpg").read_bytes())
    np.testing.assert_array_equal(
        ds.normalise(ds.batch([0], [0])).numpy(), Preprocessor(ds.preprocess)([one])
    )


def test_preprocess_is_a_server_config() -> None:
    from server.imaging import PreprocessConfig

    cfg = PreprocessConfig.from_dict(omniglot_preprocess(32))
    assert cfg.size == (32, 32) and cfg.invert and cfg.channels == "L"


def test_omniglot_ink_crop_ignores_where_a_character_is_drawn(tmp_path: Path) -> None:
    files = {f"s/Alpha/character01/001_0{d}.png": png(glyph(1, (4 * d, -3 * d))) for d in (1, 2)}
    source = write_zip(tmp_path / "a.zip", files)
    plain = load_omniglot([source], size=20)
    inked = load_omniglot([source], size=20, crop="ink", ink_margin=0.1)
    assert not np.array_equal(plain.images[0], plain.images[1])
    np.testing.assert_array_equal(inked.images[0], inked.images[1])
    assert inked.preprocess["crop"] == "ink" and inked.preprocess["ink_margin"] == 0.1
    assert "ink_margin" not in plain.preprocess


def test_crop_setting_is_checked() -> None:
    from training.config import TrainConfig

    assert TrainConfig(crop="ink").crop == "ink"
    with pytest.raises(ValueError, match="crop must be none or ink"):
        TrainConfig(crop="centre")
    with pytest.raises(ValueError, match="applies to omniglot"):
        TrainConfig(dataset="fashion-mnist", crop="ink")
