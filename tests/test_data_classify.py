"""Tests for vistrain.data.image (robust loading) and vistrain.data.classify (ImageFolder data)."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from vistrain.data.classify import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClassifyDataset,
    DatasetError,
    ImageFolderIndex,
    denormalize,
    format_skip_summary,
    resolve_classify_data,
    scan_image_folder,
    split_index,
)
from vistrain.data.image import IMAGE_SUFFIXES, BadImageError, is_image_file, load_image, load_rgb_array

# --------------------------------------------------------------------------------------------------
# helpers


def _rgb(h=24, w=32, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _write(path: Path, h=24, w=32, seed=0, fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_rgb(h, w, seed)).save(path, format=fmt)
    return path


def _truncated_jpeg(path: Path, size=256) -> Path:
    _write(path, size, size, seed=1, fmt="JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _snapshot(root: Path) -> dict[Path, tuple[bytes, int]]:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------------
# image.py


def test_suffixes_and_is_image_file():
    assert all(s == s.lower() and s.startswith(".") for s in IMAGE_SUFFIXES)
    readable = {k.lower() for k in Image.registered_extensions()}
    assert set(IMAGE_SUFFIXES) <= readable  # only what PIL can actually read
    assert is_image_file("a/b.JPG") and is_image_file(Path("x.Png")) and is_image_file("y.tiff")
    assert not is_image_file("notes.txt") and not is_image_file(".DS_Store") and not is_image_file("jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # importing must not relax truncation checks


def _make(mode: str, tmp_path: Path) -> tuple[Path, Image.Image]:
    h, w = 20, 30
    rng = np.random.default_rng(0)
    if mode == "1":
        im, ext = Image.fromarray(rng.integers(0, 2, (h, w)).astype(bool)), ".png"
    elif mode in ("L", "LA", "RGBA", "CMYK", "P"):
        im = Image.fromarray(_rgb(h, w)).convert(mode if mode != "P" else "RGB")
        if mode == "P":
            im = im.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        ext = ".jpg" if mode == "CMYK" else ".png"
    elif mode == "P_transparency":
        im = Image.fromarray(_rgb(h, w)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        im.info["transparency"] = 0
        ext = ".png"
    elif mode == "I;16":
        im, ext = Image.fromarray(np.linspace(0, 65535, h * w).reshape(h, w).astype(np.uint16)), ".png"
    elif mode == "I":
        im, ext = Image.fromarray(np.linspace(0, 65535, h * w).reshape(h, w).astype(np.int32)), ".tif"
    elif mode == "F":
        im, ext = Image.fromarray(np.linspace(0, 1, h * w).reshape(h, w).astype(np.float32)), ".tif"
    else:
        raise AssertionError(mode)
    path = tmp_path / f"img_{mode.replace(';', '_')}{ext}"
    im.save(path)
    return path, im


@pytest.mark.parametrize("mode", ["1", "L", "LA", "RGBA", "P", "P_transparency", "I;16", "I", "F", "CMYK"])
def test_every_mode_loads_as_rgb(mode, tmp_path):
    path, _ = _make(mode, tmp_path)
    opened = Image.open(path)
    expected_mode = {"P_transparency": "P"}.get(mode, mode)
    assert opened.mode == expected_mode, f"fixture did not produce mode {mode}"
    opened.close()
    img = load_image(path)
    assert isinstance(img, Image.Image)
    assert img.mode == "RGB" and img.size == (30, 20)
    a = np.asarray(img)
    assert a.shape == (20, 30, 3) and a.dtype == np.uint8
    img.load()  # already loaded, still usable after the file was closed


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depth_is_scaled_not_clipped(mode, tmp_path):
    path, _ = _make(mode, tmp_path)  # a ramp over the full range: 0..65535 (or 0..1 for F)
    a = np.asarray(load_image(path))[..., 0].astype(int).ravel()
    assert a[0] == 0 and a[-1] == 255
    assert np.all(np.diff(a) >= 0)  # still a monotonic ramp
    assert 120 <= a[len(a) // 2] <= 135  # the middle of the range is mid-grey, not saturated
    assert (a == 255).mean() < 0.05  # clipping would make almost all pixels 255


def test_8bit_values_in_int_container_kept(tmp_path):
    path = tmp_path / "i8.tif"
    Image.fromarray(np.arange(200, dtype=np.int32).reshape(10, 20)).save(path)
    a = np.asarray(load_image(path))[..., 0].ravel()
    assert np.array_equal(a, np.arange(200))


def test_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200  # red-ish, fully transparent on the left half
    rgba[:, 2:, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    a = np.asarray(load_image(tmp_path / "a.png"))
    assert (a[:, :2] == 255).all()  # transparent -> white
    assert (a[:, 2:] == [200, 0, 0]).all()  # opaque untouched

    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    p.putpixel((3, 3), 1)
    p.save(tmp_path / "p.png", transparency=0)
    a = np.asarray(load_image(tmp_path / "p.png"))
    assert (a[0, 0] == 255).all() and (a[3, 3] == [10, 20, 30]).all()


def test_exif_orientation_applied(tmp_path):
    path = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    Image.fromarray(_rgb(20, 40)).save(path, exif=exif)
    with Image.open(path) as raw:
        assert raw.size == (40, 20)
    assert load_image(path).size == (20, 40)
    assert load_image(path, draft=(8, 8)).size[1] > load_image(path, draft=(8, 8)).size[0]


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
def test_load_rgb_array_jpeg_fast_path_equals_pillow(tmp_path, mode, orientation):
    """JPEGs decode through OpenCV: same pixels and orientation as load_image (CMYK within rounding)."""
    rng = np.random.default_rng(orientation)
    smooth = np.kron((rng.random((5, 8, 3)) * 255).astype(np.uint8), np.ones((6, 6, 1), np.uint8))
    path = tmp_path / "im.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(smooth).convert(mode).save(path, exif=exif)
    ref = np.asarray(load_image(path)).astype(int)
    fast = load_rgb_array(path)
    assert fast.dtype == np.uint8 and fast.shape == ref.shape
    assert np.abs(fast.astype(int) - ref).max() <= (1 if mode == "CMYK" else 0)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_load_rgb_array_bad_file_raises_bad_image_error(tmp_path, suffix):
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(b"not an image at all")
    with pytest.raises(BadImageError, match="bad"):
        load_rgb_array(path)


@pytest.mark.parametrize("kind", ["truncated", "empty", "text", "missing"])
def test_bad_files_raise_bad_image_error(kind, tmp_path):
    path = tmp_path / "bad.jpg"
    if kind == "truncated":
        _truncated_jpeg(path)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not an image\n" * 20)
    before = path.read_bytes() if path.exists() else None
    for draft in (None, (64, 64)):  # the fast draft decode must detect truncation too
        with pytest.raises(BadImageError) as ei:
            load_image(path, draft=draft)
        e = ei.value
        assert e.path == path and str(e) == f"{path}: {e.reason}"
        assert str(path) in str(e)
    expected = {"truncated": "truncated file", "empty": "empty file",
                "text": "cannot identify image file", "missing": "file not found"}[kind]
    assert e.reason == expected
    if before is not None:
        assert path.read_bytes() == before
    e2 = pickle.loads(pickle.dumps(e))  # crosses DataLoader worker boundaries
    assert (e2.path, e2.reason, str(e2)) == (e.path, e.reason, str(e))


def test_truncated_png_detected(tmp_path):
    path = _write(tmp_path / "x.png", 64, 64)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(BadImageError, match="truncated file"):
        load_image(path)


# --------------------------------------------------------------------------------------------------
# scan_image_folder


@pytest.fixture
def messy(tmp_path) -> Path:
    root = tmp_path / "data"
    for i in range(3):
        _write(root / "cat" / f"c{i}.jpg", seed=i)
    _write(root / "cat" / "sub" / "deep" / "c9.PNG", seed=9)  # recursive, upper-case suffix
    _truncated_jpeg(root / "cat" / "trunc.jpg")
    _write(root / "dog" / "d0.png")
    (root / "dog" / "zero.jpg").write_bytes(b"")
    (root / "dog" / "text.jpg").write_text("not an image")
    (root / "dog" / "notes.txt").write_text("ignored")
    (root / "dog" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    _write(root / "dog" / ".hidden.jpg")  # hidden file
    _write(root / "dog" / ".cache" / "h.jpg")  # hidden folder
    (root / "emu").mkdir()  # class folder with nothing usable
    (root / "emu" / "readme.txt").write_text("no pics")
    _write(root / ".trash" / "x.jpg")  # hidden class folder
    _write(root / "__MACOSX" / "cat" / "c0.jpg")  # macOS zip resource forks are not a class
    (root / "labels.csv").write_text("a,b\n")  # loose non-image file at root
    return root


def test_scan_skips_and_reports(messy):
    before = _snapshot(messy)
    index = scan_image_folder(messy, workers=4)
    assert _snapshot(messy) == before  # nothing was modified (bytes and mtime)

    assert index.names == ["cat", "dog", "emu"]
    assert index.root == messy
    paths = [p for p, _ in index.samples]
    assert paths == sorted(paths)
    rel = {p.relative_to(messy).as_posix(): c for p, c in index.samples}
    assert rel == {"cat/c0.jpg": 0, "cat/c1.jpg": 0, "cat/c2.jpg": 0, "cat/sub/deep/c9.PNG": 0, "dog/d0.png": 1}
    assert len(index) == 5 and index.class_counts() == [4, 1, 0]
    reasons = {p.name: r for p, r in index.skipped}
    assert reasons == {"trunc.jpg": "truncated file", "zero.jpg": "empty file", "text.jpg": "cannot identify image file"}
    assert index.empty_classes == ["emu"] and index.missing_classes == []

    lines = format_skip_summary(index, "train")
    assert lines[0] == "train: 5 images in 3 classes, 3 corrupt skipped, 1 empty class folder"
    assert f"  skipped {messy / 'cat' / 'trunc.jpg'}: truncated file" in lines
    assert f"  empty class folder: {messy / 'emu'} (no valid images)" in lines
    assert len(lines) == 1 + 3 + 1

    # sequential check gives the same answer; no check keeps the bad files
    assert scan_image_folder(messy, workers=0) == index
    unchecked = scan_image_folder(messy, check_images=False)
    assert len(unchecked.samples) == 8 and unchecked.skipped == []


def test_scan_errors(tmp_path):
    with pytest.raises(DatasetError) as ei:
        scan_image_folder(tmp_path / "nope")
    assert str(ei.value) == f"{tmp_path / 'nope'}: folder does not exist"

    flat = tmp_path / "flat"
    _write(flat / "a.jpg")
    with pytest.raises(DatasetError, match=r"no class folders.*1 images lie directly.*root/CLASS/image\.jpg"):
        scan_image_folder(flat)

    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "b").mkdir()
    (empty / "b" / "x.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"no images found in 2 class folders.*root/CLASS/image\.jpg"):
        scan_image_folder(empty)

    broken = tmp_path / "broken"
    (broken / "a").mkdir(parents=True)
    (broken / "a" / "x.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match="all 1 images are unreadable"):
        scan_image_folder(broken)

    with pytest.raises(DatasetError, match="not a folder"):
        scan_image_folder(flat / "a.jpg")


# --------------------------------------------------------------------------------------------------
# splits


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "tree"
    counts = {"ant": 10, "bee": 7, "cow": 2, "doe": 1, "elk": 20}
    for name, n in counts.items():
        for i in range(n):
            _write(root / name / f"{i:02d}.png", 8, 8, seed=i)
    return root


def _pairs(index: ImageFolderIndex) -> set[tuple[Path, int]]:
    return set(index.samples)


def test_random_split_reproducible_and_stratified(tree):
    full = scan_image_folder(tree)
    tr, va = resolve_classify_data(tree, split=0.8, seed=0)
    tr2, va2 = resolve_classify_data(tree, split=0.8, seed=0)
    assert tr == tr2 and va == va2  # same seed -> same split
    assert tr.names == va.names == ["ant", "bee", "cow", "doe", "elk"]
    assert not (_pairs(tr) & _pairs(va))  # no overlap
    assert _pairs(tr) | _pairs(va) == set(full.samples)  # union = all
    assert [p for p, _ in va.samples] == sorted(p for p, _ in va.samples)
    assert va.class_counts() == [2, 1, 1, 0, 4]  # ~20 % per class, >= 1 val when a class has >= 2
    assert tr.class_counts() == [8, 6, 1, 1, 16]

    others = [resolve_classify_data(tree, split=0.8, seed=s)[1] for s in (1, 2)]
    assert any(_pairs(o) != _pairs(va) for o in others)  # different seed -> different split
    assert all(o.class_counts() == va.class_counts() for o in others)

    # split_index on an existing index is the same operation; None -> everything trains
    assert split_index(full, 0.8, 0) == (tr, va)
    t_all, v_none = split_index(full, None)
    assert len(t_all) == len(full) and len(v_none) == 0
    with pytest.raises(ValueError):
        split_index(full, 1.5)


def test_split_of_a_class_does_not_depend_on_other_classes(tree, tmp_path):
    _, va = resolve_classify_data(tree, seed=3)
    _write(tree / "aaa" / "new.png", 8, 8)  # a new class sorts first and shifts all indices
    _, va2 = resolve_classify_data(tree, seed=3)
    names = lambda idx: {p.relative_to(tree) for p, _ in idx.samples}  # noqa: E731
    assert names(va) == names(va2)


def test_train_val_layout(tmp_path):
    data = tmp_path / "ds"
    for c in ("a", "b", "c"):
        for i in range(2):
            _write(data / "train" / c / f"{i}.jpg", seed=i)
    _write(data / "val" / "c" / "0.jpg")
    _write(data / "val" / "a" / "0.jpg")
    (data / "val" / "b").mkdir()
    _write(data / "test" / "b" / "0.jpg")  # ignored: val wins
    tr, va = resolve_classify_data(data)
    assert tr.names == va.names == ["a", "b", "c"] and len(tr) == 6
    assert [(p.parent.name, c) for p, c in va.samples] == [("a", 0), ("c", 2)]
    assert va.empty_classes == ["b"]

    # val missing a class: indices still follow train
    (data / "val" / "b").rmdir()
    _, va = resolve_classify_data(data)
    assert va.missing_classes == ["b"] and [c for _, c in va.samples] == [0, 2]
    assert format_skip_summary(va, "val")[0] == "val: 2 images in 3 classes, 1 missing class folder"

    # a val class that train does not have is an error naming the folder and the classes
    _write(data / "val" / "zebra" / "0.jpg")
    with pytest.raises(DatasetError) as ei:
        resolve_classify_data(data)
    msg = str(ei.value)
    assert "zebra" in msg and str(data / "val" / "zebra") in msg and "['a', 'b', 'c']" in msg

    # fallbacks: valid, then test, then a random split of train
    import shutil

    shutil.rmtree(data / "val")
    _write(data / "valid" / "a" / "v.jpg")
    assert [p.name for p, _ in resolve_classify_data(data)[1].samples] == ["v.jpg"]
    shutil.rmtree(data / "valid")
    assert [p.parent.name for p, _ in resolve_classify_data(data)[1].samples] == ["b"]  # test/b/0.jpg
    shutil.rmtree(data / "test")
    tr, va = resolve_classify_data(data, split=0.5, seed=0)
    assert len(tr) == 3 and len(va) == 3 and va.class_counts() == [1, 1, 1]

    with pytest.raises(DatasetError, match="folder does not exist"):
        resolve_classify_data(tmp_path / "missing")


# --------------------------------------------------------------------------------------------------
# ClassifyDataset


def test_dataset_eval_and_augment(tmp_path):
    samples = [(_write(tmp_path / "a.png", 40, 60, seed=0), 0), (_write(tmp_path / "b.jpg", 300, 200, seed=1), 3)]
    for augment in (False, True):
        ds = ClassifyDataset(samples, imgsz=32, augment=augment)
        assert len(ds) == 2
        for i, (_, label) in enumerate(samples):
            x, y = ds[i]
            assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and x.is_contiguous()
            assert y == label and isinstance(y, int)
            assert torch.isfinite(x).all() and -2.2 < x.min() and x.max() < 2.7
    ds = ClassifyDataset(samples, imgsz=32, augment=True, fliplr=0.0, hsv=0.0, scale=(0.1, 0.2))
    assert ds[1][0].shape == (3, 32, 32)
    with pytest.raises(IndexError):
        ds[2]


def test_denormalize_round_trip(tmp_path):
    a = _rgb(16, 16, seed=5)
    Image.fromarray(a).save(tmp_path / "x.png")
    x, _ = ClassifyDataset([(tmp_path / "x.png", 0)], imgsz=16)[0]  # same size: resize is identity
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(x, (torch.from_numpy(a).permute(2, 0, 1) / 255 - mean) / std, atol=1e-5)
    back = denormalize(x)
    assert back.dtype == torch.uint8 and back.shape == (3, 16, 16)
    assert (back.permute(1, 2, 0).int() - torch.from_numpy(a).int()).abs().max() <= 1
    assert denormalize(x[None].repeat(2, 1, 1, 1)).shape == (2, 3, 16, 16)  # batched


def test_dataloader_survives_file_deleted_after_scan(tmp_path, caplog):
    root = tmp_path / "d"
    for c in ("x", "y"):
        for i in range(3):
            _write(root / c / f"{i}.png", 12, 12, seed=i)
    index = scan_image_folder(root)
    gone = root / "x" / "1.png"
    gone.unlink()
    (root / "y" / "0.png").write_bytes(b"garbage")  # replaced by a corrupt file
    ds = ClassifyDataset(index.samples, imgsz=8)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=0, shuffle=False)
    with caplog.at_level(logging.WARNING, logger="vistrain"):
        for _ in range(2):  # two epochs: warn only once per file
            batches = list(loader)
    assert sum(len(y) for _, y in batches) == 6
    assert ds.failed == {gone, root / "y" / "0.png"}
    warned = [r for r in caplog.records if r.name == "vistrain" and r.levelno == logging.WARNING]
    assert len(warned) == 2 and any(str(gone) in r.getMessage() for r in warned)
    # the replacement for a bad sample is the next readable one, with its own label
    x, y = ds[1]
    assert y == 0 and x.shape == (3, 8, 8)

    all_bad = ClassifyDataset([(gone, 0)], imgsz=8)
    with pytest.raises(DatasetError, match="none of the 1 images"):
        all_bad[0]
