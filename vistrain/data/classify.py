"""Image classification data in the ImageFolder layout (``root/CLASS/**/image.jpg``).

* :func:`scan_image_folder` lists one split and (optionally) decodes every
  image once, in threads, so corrupt files are reported up front instead of
  crashing a DataLoader worker in the middle of an epoch.
* :func:`resolve_classify_data` finds the train/val splits of a dataset folder
  (``data/train`` + ``data/val|valid|test``), or splits a single class tree at
  random, stratified per class and reproducible from a seed.
* :class:`ClassifyDataset` decodes with PIL, resizes/augments the uint8 tensor
  with ``torchvision.transforms.v2`` and normalises with the ImageNet mean/std.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from PIL import Image
from torchvision.transforms import v2

from .image import IMAGE_SUFFIXES, BadImageError, is_image_file, load_image
from .sampler import SampleKey, sample_torch_seed, split_key

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ClassifyDataset",
    "DatasetError",
    "ImageFolderIndex",
    "denormalize",
    "eval_transform",
    "format_skip_summary",
    "resolve_classify_data",
    "scan_image_folder",
    "split_index",
]

LOGGER = logging.getLogger("vistrain")



def _silence_readonly_warning() -> None:
    """ClassifyDataset.load wraps PIL's read-only pixel buffer without a copy; the tensor is never
    written in place (every transform returns a new tensor), so torch's one-time warning about it is
    noise.  Idempotent; also called per dataset because test runners reset the filters after import."""
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable", module=__name__)


_silence_readonly_warning()

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

LAYOUT_HINT = "expected layout root/CLASS/image.jpg (one sub-folder per class, images anywhere inside it)"
VAL_FOLDERS = ("val", "valid", "test")  # looked for in this order next to data/train
_IGNORED_DIRS = {"__MACOSX"}  # resource-fork folders left by macOS zip archives
_CHECK_DRAFT = (64, 64)  # JPEG DCT-domain downscale while checking: still decodes the whole stream


class DatasetError(Exception):
    """A dataset folder that cannot be used as given (missing, wrong layout, unknown class, ...)."""


@dataclass
class ImageFolderIndex:
    """The images of one split.

    ``names`` holds every class folder (sorted, or the order given by the
    train split), including folders without a single valid image, so class
    indices are identical across splits and runs; such folders are listed in
    ``empty_classes``.  ``missing_classes`` are classes of ``names`` with no
    folder in this split (only possible when ``names`` was given).
    """

    samples: list[tuple[Path, int]]  # (image path, class index), sorted by path
    names: list[str]  # class index -> class name
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (path, reason) of unreadable images
    empty_classes: list[str] = field(default_factory=list)  # class folders without any valid image
    root: Path | None = None  # the scanned folder
    missing_classes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    def class_counts(self) -> list[int]:
        """Number of samples per class index."""
        counts = [0] * len(self.names)
        for _, label in self.samples:
            counts[label] += 1
        return counts


# --------------------------------------------------------------------------------------------------
# scanning


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in _IGNORED_DIRS


def _list_images(folder: Path) -> list[Path]:
    """Image files anywhere below ``folder`` (hidden files/folders skipped, symlink loops guarded)."""
    found: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not _hidden(d)]
        found.extend(Path(dirpath, f) for f in filenames if not _hidden(f) and is_image_file(f))
    return found


def _check(path: Path) -> str | None:
    """None if ``path`` decodes, else the reason it does not."""
    try:
        load_image(path, draft=_CHECK_DRAFT)
    except BadImageError as e:
        return e.reason
    return None


def scan_image_folder(
    root: str | os.PathLike,
    names: list[str] | None = None,
    workers: int = 2,
    check_images: bool = True,
) -> ImageFolderIndex:
    """Index ``root/CLASS/**/*.{jpg,png,...}``.

    ``names``: class order to use (e.g. the train split's ``names`` when
    scanning val); a class folder not in it raises :class:`DatasetError`.
    ``check_images``: decode every image (``workers`` threads) and move the
    unreadable ones to ``skipped``.  Files are only ever opened read-only.
    """
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{root}: folder does not exist")
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder; {LAYOUT_HINT}")

    entries = sorted(root.iterdir())
    folders = sorted(p.name for p in entries if p.is_dir() and not _hidden(p.name))
    loose = sum(1 for p in entries if p.is_file() and not _hidden(p.name) and is_image_file(p))
    loose_note = f" ({loose} images lie directly in {root}, outside any class folder)" if loose else ""
    if not folders:
        raise DatasetError(f"{root}: no class folders found{loose_note}; {LAYOUT_HINT}")

    if names is None:
        names = folders
    else:
        names = list(names)
        unknown = [f for f in folders if f not in names]
        if unknown:
            raise DatasetError(
                f"{root / unknown[0]}: class folder {unknown[0]!r} is not one of the {len(names)} "
                f"training classes {names}"
                + (f" (other unknown folders: {unknown[1:]})" if len(unknown) > 1 else "")
            )
    class_index = {n: i for i, n in enumerate(names)}

    files: list[tuple[Path, int]] = []
    for folder in folders:
        label = class_index[folder]
        files.extend((p, label) for p in _list_images(root / folder))
    files.sort(key=lambda s: s[0])
    if not files:
        suffixes = " ".join(sorted(IMAGE_SUFFIXES))
        raise DatasetError(
            f"{root}: no images found in {len(folders)} class folder{'s' * (len(folders) != 1)}{loose_note}; "
            f"{LAYOUT_HINT}; image suffixes: {suffixes}"
        )

    skipped: list[tuple[Path, str]] = []
    if check_images:
        paths = [p for p, _ in files]
        if workers and workers > 1 and len(paths) > 1:
            with ThreadPoolExecutor(max_workers=int(workers), thread_name_prefix="vistrain-scan") as pool:
                reasons = list(pool.map(_check, paths, chunksize=16))
        else:
            reasons = [_check(p) for p in paths]
        samples = [s for s, r in zip(files, reasons) if r is None]
        skipped = [(p, r) for p, r in zip(paths, reasons) if r is not None]
    else:
        samples = files

    if not samples:
        p, r = skipped[0]
        raise DatasetError(f"{root}: all {len(skipped)} images are unreadable (e.g. {p}: {r})")

    present = {label for _, label in samples}
    empty = [f for f in folders if class_index[f] not in present]
    have = set(folders)
    missing = [n for n in names if n not in have]
    return ImageFolderIndex(samples, names, skipped, empty, root, missing)


# --------------------------------------------------------------------------------------------------
# splits


def split_index(
    index: ImageFolderIndex, split: float | None = 0.8, seed: int = 0
) -> tuple[ImageFolderIndex, ImageFolderIndex]:
    """Split one index into (train, val) at random, stratified per class.

    Each class keeps ``round(n * split)`` of its ``n`` images for training;
    every class with >= 2 images gives >= 1 image to val and keeps >= 1 for
    training (a single image goes to train).  The shuffle of a class depends
    only on ``seed`` and the class *name*, so the split is reproducible and
    adding a class folder does not reshuffle the others.  ``split=None`` or
    ``split >= 1`` gives an empty val split.  ``skipped``/``empty_classes``
    stay with train (reported once).
    """
    if split is not None and not 0.0 < split <= 1.0:
        raise ValueError(f"split={split!r}: expected the train fraction in (0, 1], or None")
    by_class: dict[int, list[tuple[Path, int]]] = {}
    for s in index.samples:
        by_class.setdefault(s[1], []).append(s)
    train: list[tuple[Path, int]] = []
    val: list[tuple[Path, int]] = []
    for label, items in by_class.items():
        n = len(items)
        if split is None or split >= 1.0 or n < 2:
            train.extend(items)
            continue
        n_val = min(n - 1, max(1, int(n * (1.0 - split) + 0.5)))
        key = zlib.crc32(index.names[label].encode("utf-8"))
        perm = np.random.default_rng([int(seed) % 2**63, key]).permutation(n)
        chosen = set(perm[:n_val].tolist())
        for i, s in enumerate(items):
            (val if i in chosen else train).append(s)
    train.sort(key=lambda s: s[0])
    val.sort(key=lambda s: s[0])
    names = list(index.names)
    return (
        ImageFolderIndex(train, names, list(index.skipped), list(index.empty_classes), index.root,
                         list(index.missing_classes)),
        ImageFolderIndex(val, list(names), [], [], index.root, []),
    )


def resolve_classify_data(
    data: str | os.PathLike, split: float | None = 0.8, seed: int = 0, workers: int = 2
) -> tuple[ImageFolderIndex, ImageFolderIndex]:
    """(train, val) indices of a classification dataset folder.

    * ``data/train`` exists: train = ``data/train``; val = the first of
      ``data/val``, ``data/valid``, ``data/test`` that exists, scanned with the
      train class order; with none of them, ``data/train`` is split.
    * otherwise ``data`` itself is one class tree, split at random: ``split``
      is the train fraction (see :func:`split_index`).
    """
    data = Path(data)
    if not data.exists():
        raise DatasetError(f"{data}: folder does not exist")
    if not data.is_dir():
        raise DatasetError(f"{data}: not a folder; {LAYOUT_HINT}")
    train_dir = data / "train"
    if train_dir.is_dir():
        train = scan_image_folder(train_dir, workers=workers)
        for name in VAL_FOLDERS:
            if (data / name).is_dir():
                val = scan_image_folder(data / name, names=train.names, workers=workers)
                return train, val
        return split_index(train, split, seed)
    return split_index(scan_image_folder(data, workers=workers), split, seed)


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else (plural or word + 's')}"


def format_skip_summary(index: ImageFolderIndex, split: str) -> list[str]:
    """Human summary of a split, e.g.::

        train: 412 images in 4 classes, 2 corrupt skipped, 1 empty class folder
          skipped /data/train/cat/x.jpg: truncated file
          empty class folder: /data/train/dog (no valid images)
    """
    head = f"{split}: {_plural(len(index.samples), 'image')} in {_plural(len(index.names), 'class', 'classes')}"
    if index.skipped:
        head += f", {len(index.skipped)} corrupt skipped"
    if index.empty_classes:
        head += f", {_plural(len(index.empty_classes), 'empty class folder')}"
    if index.missing_classes:
        head += f", {_plural(len(index.missing_classes), 'missing class folder')}"
    lines = [head]
    lines += [f"  skipped {p}: {r}" for p, r in index.skipped]
    where = (lambda n: index.root / n) if index.root is not None else (lambda n: n)
    lines += [f"  empty class folder: {where(n)} (no valid images)" for n in index.empty_classes]
    lines += [f"  missing class folder: {where(n)}" for n in index.missing_classes]
    return lines


# --------------------------------------------------------------------------------------------------
# dataset


def _size2(imgsz: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(imgsz, int):
        return imgsz, imgsz
    h, w = imgsz
    return int(h), int(w)


class ClassifyDataset(torch.utils.data.Dataset):
    """(image, label) pairs: ``Tensor[3, imgsz, imgsz]`` float32 normalised with ImageNet mean/std.

    Eval: squash-resize to ``imgsz`` x ``imgsz``.  ``augment=True``:
    RandomResizedCrop(scale, ratio 3/4..4/3) + horizontal flip (``fliplr``) +
    ColorJitter(brightness=contrast=saturation=``hsv``, hue=``hsv/4``).

    Decoding is PIL; JPEGs are decoded at reduced size when that still leaves
    enough pixels for the output (``fast_decode``).  Geometry runs on the
    uint8 tensor (antialiased), conversion to float comes after.

    An image that fails to decode here (changed on disk after the scan) is
    logged once, added to ``self.failed`` and replaced by the next readable
    sample (with that sample's label).  With ``num_workers > 0`` every worker
    process has its own copy of ``failed``.
    """

    def __init__(
        self,
        samples: list[tuple[Path, int]],
        imgsz: int,
        augment: bool = False,
        fliplr: float = 0.5,
        hsv: float = 0.2,
        scale: tuple[float, float] = (0.6, 1.0),
        fast_decode: bool = True,
        seed: int = 0,
    ):
        self.seed = int(seed)
        self.samples = [(Path(p), int(c)) for p, c in samples]
        self.labels = [c for _, c in self.samples]
        self.imgsz = imgsz
        self.augment = augment
        self.failed: set[Path] = set()
        _silence_readonly_warning()
        h, w = _size2(imgsz)
        ratio = (3 / 4, 4 / 3)
        if augment:
            geometry = [v2.RandomResizedCrop((h, w), scale=tuple(scale), ratio=ratio, antialias=True)]
            if fliplr > 0:
                geometry.append(v2.RandomHorizontalFlip(fliplr))
            self.geometry = v2.Compose(geometry)
            # colour ops are cheaper on float [0, 1] than on uint8 (no round trips)
            self.color = v2.ColorJitter(hsv, hsv, hsv, min(hsv / 4, 0.5)) if hsv > 0 else None
            # smallest crop side is sqrt(scale_min * 3/4) of the image side: decode at least that big
            shrink = math.sqrt(max(scale[0], 1e-3) * min(ratio[0], 1 / ratio[1]))
        else:
            self.geometry = v2.Resize((h, w), antialias=True)
            self.color = None
            shrink = 1.0
        side = math.ceil(max(h, w) / shrink)
        self.draft = (side, side) if fast_decode else None
        self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> Tensor:
        """uint8 ``Tensor[3, H, W]`` of sample ``i`` (raises BadImageError)."""
        img = load_image(self.samples[i][0], draft=self.draft)
        # HWC array viewed as CHW (channels-last strides): the fast path of the uint8 antialiased resize.
        # Read-only and uncopied: transforms never modify their input in place.
        return torch.from_numpy(np.asarray(img)).permute(2, 0, 1)

    def transform(self, x: Tensor) -> Tensor:
        """uint8 ``Tensor[3, H, W]`` -> normalised float ``Tensor[3, h, w]``."""
        x = self.geometry(x)
        x = x.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)
        if self.color is not None:
            x = self.color(x)
        return x.sub_(self._mean).div_(self._std)

    def __getitem__(self, key: int | SampleKey) -> tuple[Tensor, int]:
        """Sample ``i`` (a plain index, or a training loader's ``SampleKey(i, epoch)``). Augmentation draws from
        torch's generator seeded by ``(seed, epoch, i)`` (the caller's generator state is restored), so a
        sample is the same whatever process loads it, and resume repeats the uninterrupted run."""
        i, epoch = split_key(key)
        n = len(self.samples)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} samples")
        i %= n
        for k in range(n):
            j = (i + k) % n
            path, label = self.samples[j]
            if path in self.failed:
                continue
            try:
                x = self.load(j)
            except BadImageError as e:
                self.failed.add(path)
                LOGGER.warning("skipping unreadable image %s (using another sample instead)", e)
                continue
            if not self.augment:
                return self.transform(x), label
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_torch_seed(self.seed, epoch, i))
                return self.transform(x), label
        raise DatasetError(f"none of the {n} images could be read; first failure: {next(iter(self.failed), '?')}")


def denormalize(x: Tensor) -> Tensor:
    """Inverse of the ImageNet normalisation: float ``[..., 3, H, W]`` -> uint8 in [0, 255]."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=x.device).view(3, 1, 1)
    y = (x.detach().float() * std + mean) * 255.0
    return y.round_().clamp_(0, 255).to(torch.uint8)


def eval_transform(image: Image.Image, imgsz: int) -> Tensor:
    """The validation transform for one RGB PIL image (prediction): squash-resize + normalise."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"))).permute(2, 0, 1)
    x = v2.functional.resize(x, list(_size2(imgsz)), antialias=True)
    x = x.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return x.sub_(mean).div_(std)
