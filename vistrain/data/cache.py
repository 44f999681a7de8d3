"""``cache=ram|disk``: the decoded, resized training images kept, so each epoch skips decoding and resizing.

What is kept is exactly what :meth:`DetectDataset._decode` computes (the image with its long side at ``imgsz``), so a
sample is bit-identical with or without the cache.  ``ram`` holds the arrays in the loading process (DataLoader
workers inherit them); its size is estimated from the images' sizes before anything is decoded, and a cache that
would not fit in the available memory is refused with one line.  ``disk`` writes one ``.npy`` per image under
``$VISTRAIN_CACHE/images`` (keyed by the file's path, size, modification time and ``imgsz``) and reads it back.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from vistrain.engine.utils import LOGGER, UserError

RAM_MARGIN = 1.5  # the estimate times this must fit in the available memory (workers, other buffers, the model)


def cache_mode(value) -> str | None:
    """The ``cache`` key -> ``'ram'``, ``'disk'`` or None (``true`` is ``ram``, as in ultralytics)."""
    v = str(value).strip().lower() if value is not None else ""
    if v in ("", "false", "none", "0", "no"):
        return None
    return "ram" if v in ("true", "1", "yes", "ram") else v


def available_memory() -> int:
    """Bytes of memory available to new allocations (``MemAvailable`` on Linux)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def resized_bytes(shapes: list[tuple[int, int]], imgsz: int) -> int:
    """Bytes of the images of ``shapes`` ((h, w) each) with their long side at ``imgsz``, 3 channels uint8."""
    total = 0
    for h, w in shapes:
        r = imgsz / max(h, w)
        total += max(1, round(h * r)) * max(1, round(w * r)) * 3
    return total


def disk_path(root: Path, im_file: str, imgsz: int) -> Path:
    st = os.stat(im_file)
    key = hashlib.sha1(f"{os.path.abspath(im_file)}|{st.st_size}|{st.st_mtime_ns}|{imgsz}".encode()).hexdigest()
    return root / f"{key[:24]}.npy"


class ImageCache:
    """Resized images of a dataset by index, in RAM or on disk; :meth:`get` returns None for one not cached."""

    def __init__(self, mode: str, files: list[str], shapes: list[tuple[int, int]], imgsz: int, split: str,
                 decode: Callable[[int], np.ndarray], workers: int = 2):
        if mode not in ("ram", "disk"):
            raise UserError(f"cache={mode}: use cache=ram, cache=disk or cache=false")
        self.mode, self.files, self.imgsz = mode, files, imgsz
        self.ram: dict[int, np.ndarray] = {}
        need = resized_bytes(shapes, imgsz)
        if mode == "ram":
            free = available_memory()
            if need * RAM_MARGIN > free:
                raise UserError(f"cache=ram: the {split} images at imgsz={imgsz} need {need / 2**30:.1f} GB "
                                f"(x{RAM_MARGIN} margin), {free / 2**30:.1f} GB is available; use cache=disk, a "
                                f"smaller imgsz, or cache=false")
        from vistrain.data.yolo import cache_dir

        self.root = cache_dir() / "images"
        if mode == "disk":
            self.root.mkdir(parents=True, exist_ok=True)

        def fill(i: int) -> int:
            if mode == "disk":
                path = disk_path(self.root, files[i], imgsz)
                if path.is_file():
                    return 0
                img = decode(i)
                tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
                np.save(tmp, img)
                os.replace(tmp, path)
                return img.nbytes
            self.ram[i] = decode(i)
            return self.ram[i].nbytes

        with ThreadPoolExecutor(max(1, workers)) as pool:  # cv2 and PIL decode without the GIL
            done = sum(pool.map(fill, range(len(files))))
        LOGGER.info(f"{split}: cache={mode}: {len(files)} images, {need / 2**20:.0f} MB"
                    + (f" ({done / 2**20:.0f} MB written to {self.root})" if mode == "disk" else ""))

    def get(self, i: int) -> np.ndarray | None:
        if self.mode == "ram":
            return self.ram.get(i)
        path = disk_path(self.root, self.files[i], self.imgsz)
        try:
            return np.load(path)
        except (OSError, ValueError):
            return None
