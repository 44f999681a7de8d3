"""YOLO-format datasets: the ultralytics dataset YAML, label files, verification and its cache.

A dataset YAML names a root ``path`` and the ``train`` / ``val`` / ``test`` splits (each a folder of
images, a ``.txt`` list of image paths, or a list of either, relative to ``path``) and the class
``names`` (a list, or a dict ``{index: name}``).  The labels of ``.../images/.../x.jpg`` are in
``.../labels/.../x.txt``: one object per line, ``cls cx cy w h`` (a box) or ``cls x1 y1 x2 y2 ...``
(a polygon of at least 3 points, whose bounding box is the object's box), normalised to 0..1.
An image without a label file, or with an empty one, is a background image.

Verification reads every label file once and reports each bad line as ``file:line: what is wrong``;
a bad line drops that line (or, for coordinates slightly out of range, is clipped), never the whole
image.  Unreadable images are skipped.  The result is cached under ``$VISTRAIN_CACHE`` (default
``~/.cache/vistrain``), keyed by the split and invalidated by a hash of the image and label files'
paths, sizes and modification times.  User files are only ever read.

Pascal VOC (``vistrain.data.voc``) and COCO JSON (``vistrain.data.coco``) datasets are read into the same
:class:`ImageLabels`, verified and cached the same way: :func:`load_data` resolves ``data=`` (a YAML, a folder, a
JSON) and :func:`scan_data_split` reads a split of any of the three formats.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml
from PIL import Image

from vistrain.data.image import BadImageError, is_image_file, load_image

LOGGER = logging.getLogger("vistrain")
CACHE_VERSION = 3  # 2: label files read as utf-8-sig (a BOM no longer drops the first row); 3: difficult, source
FORMATS = ("yolo", "voc", "coco")
COORD_TOL = 0.01  # coordinates within this of 0..1 are clipped silently; beyond it, clipped with a message
MAX_MESSAGES = 30  # label problems printed per split; the rest are counted
_CHECK_DRAFT = (64, 64)


class DataYAMLError(Exception):
    """A dataset YAML or split that cannot be used as given."""


# ------------------------------------------------------------------------------------ dataset YAML
def _names_list(names, source: str) -> list[str]:
    if isinstance(names, dict):
        try:
            keys = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            raise DataYAMLError(f"{source}: names keys must be class indices 0..N-1, got {list(names)[:5]}") from None
        if keys != list(range(len(keys))):
            raise DataYAMLError(f"{source}: names keys must be 0..{len(keys) - 1} without gaps, got {keys}")
        lookup = {int(k): v for k, v in names.items()}
        return [str(lookup[i]) for i in keys]
    if isinstance(names, (list, tuple)) and names:
        return [str(n) for n in names]
    raise DataYAMLError(f"{source}: 'names' must be a list of class names or a dict {{0: name, ...}}")


DATA_KEYS = ("path", "train", "val", "test", "names", "nc", "download", "format")


def _misspelt_key(data: dict) -> tuple[str, str] | None:
    """``(key, known key)`` for a key that looks like a misspelling of a known key the YAML lacks (``trian``:
    ``train``), else None.  Other extra keys are allowed, as ultralytics allows them."""
    import difflib

    absent = [k for k in DATA_KEYS if k not in data]
    for key in data:
        if not isinstance(key, str) or key in DATA_KEYS:
            continue
        near = difflib.get_close_matches(key.lower(), absent, n=1, cutoff=0.75)
        near = near or [k for k in absent if sorted(k) == sorted(key.lower())]  # swapped letters: 'vla'
        if near:
            return key, near[0]
    return None


def load_data_yaml(path: str | os.PathLike) -> dict:
    """Read a dataset YAML; return it with ``path`` made absolute and ``names`` as a list (``nc`` set).

    A relative ``path`` (or none) is taken relative to the YAML file's folder.
    """
    file = Path(path)
    if not file.is_file():
        raise DataYAMLError(f"data={path}: file does not exist")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise DataYAMLError(f"{file}{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    except UnicodeDecodeError:
        raise DataYAMLError(f"{file}: not a text file") from None
    if not isinstance(data, dict):
        raise DataYAMLError(f"{file}: expected a mapping with keys path, train, val, names")
    fmt = _yaml_format(data, file)
    needed = ("train", "val", "names") if fmt == "yolo" else ("train", "val")  # VOC / COCO files name the classes
    missing = [k for k in needed if k not in data]
    typo = _misspelt_key(data)
    if typo:
        raise DataYAMLError(f"unknown key '{typo[0]}' in {file}; did you mean '{typo[1]}'?")
    if missing:
        raise DataYAMLError(f"{file}: missing key(s) {', '.join(missing)} (a dataset YAML needs {', '.join(needed)})")
    root = Path(data.get("path") or ".").expanduser()
    if not root.is_absolute():
        root = (file.parent / root).resolve()
    out = {**data, "path": str(root), "format": fmt, "yaml_file": str(file.resolve())}
    if data.get("names") is not None or fmt == "yolo":
        out["names"] = _names_list(data.get("names"), str(file))
        out["nc"] = len(out["names"])
    else:
        out.pop("names", None)
    if fmt == "voc":
        from vistrain.data.voc import complete_voc_data

        out = complete_voc_data(out)
    elif fmt == "coco":
        from vistrain.data.coco import complete_coco_data

        out = complete_coco_data(out)
    if data.get("nc") is not None and int(data["nc"]) != len(out["names"]):
        raise DataYAMLError(f"{file}: nc={data['nc']} but names lists {len(out['names'])} classes")
    return {**out, "nc": len(out["names"])}


def _yaml_format(data: dict, file: Path) -> str:
    """``format:`` of a dataset YAML; without one, ``coco`` when its train split names .json files, else yolo."""
    fmt = data.get("format")
    if fmt in (None, ""):
        train = data.get("train")
        entries = train if isinstance(train, (list, tuple)) else [train]
        return "coco" if entries and all(str(e).lower().endswith(".json") for e in entries) else "yolo"
    if str(fmt).lower() not in FORMATS:
        raise DataYAMLError(f"{file}: format: {fmt}; expected one of {', '.join(FORMATS)}")
    return str(fmt).lower()


def load_data(ref: str | os.PathLike) -> dict:
    """The dataset ``data=`` names, as :func:`load_data_yaml` returns it (``format`` set): a dataset YAML; a folder
    holding ``data.yaml``; a Pascal VOC folder (``Annotations/`` + ``JPEGImages/``); a COCO instances JSON; or a
    folder with COCO JSONs (``annotations/instances_*.json``)."""
    path = Path(ref).expanduser()
    if path.is_dir():
        from vistrain.data.coco import coco_folder_jsons, load_coco_json_data
        from vistrain.data.voc import is_voc_root, load_voc_folder

        if (path / "data.yaml").is_file():
            return load_data_yaml(path / "data.yaml")
        if is_voc_root(path):
            return load_voc_folder(path)
        jsons = coco_folder_jsons(path)
        if jsons:
            return load_coco_json_data(jsons[0], jsons[1])
        raise DataYAMLError(f"data={ref}: a folder without data.yaml, without Annotations/ + JPEGImages/ (Pascal VOC) "
                            f"and without annotations/instances_*.json (COCO); give a dataset YAML (path, train, val, "
                            f"names)")
    if not path.exists():
        raise DataYAMLError(f"data={ref}: file does not exist")
    if path.suffix.lower() == ".json":
        from vistrain.data.coco import load_coco_json_data

        return load_coco_json_data(path)
    return load_data_yaml(path)


def _resolve(root: Path, p: str | os.PathLike) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else root / q


def list_split_images(data: dict, split: str) -> list[Path]:
    """Image files of ``data[split]``: folders searched recursively, ``.txt`` lists read line by line
    (relative lines are relative to the list file's folder), or a list of either; sorted, unique."""
    spec = data.get(split)
    if spec in (None, ""):
        raise DataYAMLError(f"{data.get('yaml_file', 'data')}: no '{split}' split")
    root = Path(data["path"])
    files: set[Path] = set()
    for entry in spec if isinstance(spec, (list, tuple)) else [spec]:
        p = _resolve(root, str(entry))
        if p.is_dir():
            files.update(f for f in p.rglob("*") if f.is_file() and is_image_file(f))
        elif p.is_file() and p.suffix.lower() == ".txt":
            for line in p.read_text(encoding="utf-8-sig", errors="replace").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    files.add(_resolve(p.parent, line))
        elif p.is_file() and is_image_file(p):
            files.add(p)
        else:
            raise DataYAMLError(f"{data.get('yaml_file', 'data')}: {split}: {p} does not exist "
                                f"(give a folder of images, a .txt list of images, or a list of these)")
    return sorted(files)


def label_path(image: Path) -> Path:
    """``.../images/a/b.jpg`` -> ``.../labels/a/b.txt`` (the last ``images`` folder in the path)."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


# ------------------------------------------------------------------------------------ label lines
@dataclass
class ImageLabels:
    """Verified labels of one image; coordinates normalised to 0..1 of the (EXIF-rotated) image."""

    im_file: str
    shape: tuple[int, int]  # (height, width) in pixels
    cls: np.ndarray  # int64[N]
    boxes: np.ndarray  # float32[N, 4] cx, cy, w, h
    segments: list[np.ndarray] = field(default_factory=list)  # N float32[K, 2] polygons ([0, 2] for box rows)
    difficult: np.ndarray | None = None  # bool[N]: Pascal VOC's <difficult>1</difficult>; all False for YOLO / COCO
    source: str = ""  # where the labels were read, for messages (a VOC XML, 'x.json: image a.jpg'); "" = YOLO .txt
    object_ids: np.ndarray | None = None  # int64[N]: each object's number in `source` (1-based); None for YOLO

    def __post_init__(self):
        if self.difficult is None:
            self.difficult = np.zeros(len(self.cls), bool)

    @property
    def has_polygons(self) -> bool:
        return any(len(s) for s in self.segments)

    def keep(self, mask: np.ndarray) -> None:
        """Keep the objects where ``mask`` (bool[N]) is True, in every per-object field."""
        mask = np.asarray(mask, bool)
        self.cls, self.boxes, self.difficult = self.cls[mask], self.boxes[mask], self.difficult[mask]
        if len(self.segments) == len(mask):
            self.segments = [s for s, k in zip(self.segments, mask) if k]
        if self.object_ids is not None:
            self.object_ids = self.object_ids[mask]


def _parse_line(text: str, nc: int) -> tuple[int, np.ndarray] | str:
    """One label line -> ``(class, values)`` or the reason it is rejected."""
    fields = text.split()
    n = len(fields)
    if n != 5 and (n < 7 or n % 2 == 0):
        hint = "; a polygon needs at least 3 points" if n in (3,) else ""
        return (f"{n} values; expected 5 (cls cx cy w h) or an odd number >= 7 "
                f"(cls x1 y1 x2 y2 x3 y3 ...){hint}")
    try:
        values = np.array([float(v) for v in fields], dtype=np.float64)
    except ValueError:
        bad = next(i for i, v in enumerate(fields) if not _is_float(v))
        return f"non-numeric value {fields[bad]!r} in column {bad + 1}"
    if not np.isfinite(values).all():
        return "non-finite value (nan or inf)"
    c = values[0]
    if c != int(c):
        return f"class id {fields[0]} is not an integer"
    if not 0 <= c < nc:
        return f"class {int(c)} outside 0..{nc - 1} (the data YAML names {nc} classes)"
    return int(c), values[1:]


def _is_float(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


def _out_of_range(values: np.ndarray) -> bool:
    return bool((values < -COORD_TOL).any() or (values > 1 + COORD_TOL).any())


def _row_geometry(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool] | str:
    """Coordinates of a row -> ``(box cx cy w h, polygon [K, 2] or [0, 2], was clipped beyond tolerance)``."""
    if len(values) == 4:
        cx, cy, w, h = values
        if w <= 0 or h <= 0:
            return "zero-area box (width or height <= 0)"
        corners = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
        clipped = _out_of_range(corners)
        x1, y1, x2, y2 = corners.clip(0, 1)
        poly = np.zeros((0, 2), np.float32)
    else:
        pts = values.reshape(-1, 2)
        clipped = _out_of_range(pts)
        pts = pts.clip(0, 1)
        (x1, y1), (x2, y2) = pts.min(0), pts.max(0)
        poly = pts.astype(np.float32)
    if x2 - x1 <= 0 or y2 - y1 <= 0:
        return "zero-area box after clipping to the image" if clipped else "zero-area box"
    box = np.array([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dtype=np.float32)
    return box, poly, clipped


def parse_label_file(path: Path, nc: int, row_lines: list[int] | None = None) -> tuple[list, list[str], int]:
    """Read one label file -> ``(rows [(cls, box, polygon)], messages, lines dropped)``.

    Each message is ``file:line: problem``.  Missing file = background (no rows, no message).  A UTF-8 byte
    order mark (Windows editors write one) is ignored.  ``row_lines``, if given, receives each row's line number.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        return [], [], 0
    except (UnicodeDecodeError, OSError) as e:
        raise ValueError(f"{path}: label file unreadable ({type(e).__name__}); expected text lines 'cls cx cy w h'")
    rows, messages, dropped, seen = [], [], 0, {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parsed = _parse_line(line, nc)
        if isinstance(parsed, str):
            messages.append(f"{path}:{lineno}: {parsed}: line dropped")
            dropped += 1
            continue
        c, values = parsed
        key = (c, *values.tolist())
        if key in seen:
            messages.append(f"{path}:{lineno}: duplicate of line {seen[key]}: dropped")
            dropped += 1
            continue
        seen[key] = lineno
        geometry = _row_geometry(values)
        if isinstance(geometry, str):
            messages.append(f"{path}:{lineno}: {geometry}: line dropped")
            dropped += 1
            continue
        box, poly, clipped = geometry
        if clipped:
            messages.append(f"{path}:{lineno}: coordinates outside 0..1: clipped to the image")
        rows.append((c, box, poly))
        if row_lines is not None:
            row_lines.append(lineno)
    return rows, messages, dropped


def image_shape(path: Path) -> tuple[int, int]:
    """``(height, width)`` after EXIF rotation; decodes the image (downscaled) to prove it is readable."""
    img = load_image(path, draft=_CHECK_DRAFT)  # raises BadImageError
    with Image.open(path) as im:
        w, h = im.size
        try:
            orientation = int(im.getexif().get(0x0112, 1) or 1)
        except Exception:
            orientation = 1
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    del img
    return h, w


def _verify_one(args: tuple[Path, int]) -> tuple[ImageLabels | None, list[str], int, str | None]:
    """Check one image and its label file -> ``(labels or None, messages, lines dropped, corrupt reason)``."""
    image, nc = args
    try:
        shape = image_shape(image)
    except BadImageError as e:
        return None, [], 0, e.reason
    try:
        rows, messages, dropped = parse_label_file(label_path(image), nc)
    except ValueError as e:
        return None, [], 0, str(e)
    if rows:
        cls = np.array([r[0] for r in rows], dtype=np.int64)
        boxes = np.stack([r[1] for r in rows]).astype(np.float32)
    else:
        cls, boxes = np.zeros(0, np.int64), np.zeros((0, 4), np.float32)
    return ImageLabels(str(image), shape, cls, boxes, [r[2] for r in rows]), messages, dropped, None


@dataclass
class SplitLabels:
    """Every usable image of a split with its verified labels, and what verification found."""

    items: list[ImageLabels]
    corrupt: list[tuple[str, str]] = field(default_factory=list)  # (image, reason)
    messages: list[str] = field(default_factory=list)  # "file:line: problem"
    dropped: int = 0  # label lines (YOLO) or objects (VOC, COCO) dropped
    unit: str = "lines"  # what `dropped` counts
    notes: list[str] = field(default_factory=list)  # not problems, logged as info (COCO crowd objects skipped)

    @property
    def backgrounds(self) -> int:
        return sum(len(it.cls) == 0 for it in self.items)

    def summary(self, split: str) -> str:
        return (f"{split}: {len(self.items)} images, {self.backgrounds} backgrounds, {len(self.corrupt)} corrupt, "
                f"{self.dropped} {self.unit} dropped, {sum(len(it.cls) for it in self.items)} objects")

    def drop_difficult(self) -> int:
        """Leave out the objects marked difficult (the images stay), as ultralytics' and the VOC tutorials'
        converters do for training; returns how many."""
        n = 0
        for it in self.items:
            if it.difficult.any():
                n += int(it.difficult.sum())
                it.keep(~it.difficult)
        return n

    def drop_box_rows(self, nc: int) -> list[str]:
        """Segmentation: drop the rows without a polygon (``cls x1 y1 x2 y2`` is 2 points, read as a box), each
        reported ``file:line``; returns those messages (also added to ``messages``)."""
        new, wheres = [], set()
        for it in self.items:
            keep = np.array([len(s) > 0 for s in it.segments], dtype=bool)
            if keep.all():
                continue
            if it.source:  # VOC / COCO: the object's number in its annotation file
                ids = it.object_ids if it.object_ids is not None else np.arange(1, len(keep) + 1)
                new += [f"{it.source}: object {ids[j]}: no polygon (a segmentation dataset needs a polygon for every "
                        f"object): dropped" for j in np.flatnonzero(~keep)]
                it.keep(keep)
                continue
            path, lines = label_path(Path(it.im_file)), []
            parse_label_file(path, nc, lines)  # the rows' line numbers (the cache keeps none)
            for j in np.flatnonzero(~keep):
                where = f"{path}:{lines[j]}" if len(lines) == len(keep) else str(path)
                wheres.add(where)
                new.append(f"{where}: 4 coordinates = 2 points; a polygon needs at least 3 (a segmentation "
                           f"dataset needs a polygon for every object): line dropped")
            it.keep(keep)
        if wheres:  # "clipped" messages about the box these rows were read as no longer apply
            self.messages = [m for m in self.messages if m.split(": coordinates outside")[0] not in wheres]
        self.messages.extend(new)
        self.dropped += len(new)
        return new

    def log(self, split: str) -> None:
        """Log every corrupt image and the first label problems (all of them are in ``messages``)."""
        for note in self.notes:
            LOGGER.info(f"{split}: {note}")
        for path, reason in self.corrupt:
            LOGGER.warning(f"{split}: skipping image {path}: {reason}")
        for msg in self.messages[:MAX_MESSAGES]:
            LOGGER.warning(msg)
        if len(self.messages) > MAX_MESSAGES:
            LOGGER.warning(f"{split}: ... and {len(self.messages) - MAX_MESSAGES} more label problems")

    # -- cache (JSON: no pickled code) --
    def to_json(self) -> dict:
        items = [{"im_file": it.im_file, "shape": list(it.shape), "cls": it.cls.tolist(), "boxes": it.boxes.tolist(),
                  "segments": [s.tolist() for s in it.segments], "difficult": it.difficult.tolist(),
                  "source": it.source, "object_ids": None if it.object_ids is None else it.object_ids.tolist()}
                 for it in self.items]
        return {"items": items, "corrupt": self.corrupt, "messages": self.messages, "dropped": self.dropped,
                "unit": self.unit}

    @classmethod
    def from_json(cls, d: dict) -> "SplitLabels":
        items = [ImageLabels(it["im_file"], tuple(it["shape"]), np.array(it["cls"], np.int64).reshape(-1),
                             np.array(it["boxes"], np.float32).reshape(-1, 4),
                             [np.array(s, np.float32).reshape(-1, 2) for s in it["segments"]],
                             np.array(it["difficult"], bool).reshape(-1), it["source"],
                             None if it["object_ids"] is None else np.array(it["object_ids"], np.int64).reshape(-1))
                 for it in d["items"]]
        return cls(items, [tuple(c) for c in d["corrupt"]], list(d["messages"]), int(d["dropped"]), d["unit"])


def cache_dir() -> Path:
    """``$VISTRAIN_CACHE`` or ``~/.cache/vistrain``."""
    return Path(os.environ.get("VISTRAIN_CACHE") or "~/.cache/vistrain").expanduser()


def _stat_lines(h, paths) -> None:
    for p in paths:
        try:
            st = p.stat()
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}|-\n".encode())


def files_hash(images: list[Path], nc: int) -> str:
    """Hash of the images' and label files' paths, sizes and modification times (and ``nc``)."""
    h = hashlib.sha256(f"v{CACHE_VERSION} nc={nc}".encode())
    for image in images:
        _stat_lines(h, (image, label_path(image)))
    return h.hexdigest()


def scan_split(images: list[Path], nc: int, workers: int = 2, use_cache: bool = True) -> tuple[SplitLabels, bool]:
    """Verify ``images`` and their labels -> ``(SplitLabels, loaded from cache)``."""
    return scan_entries(images, _verify_one_image(nc), lambda image: (image, label_path(image)), f"nc={nc}",
                        workers=workers, use_cache=use_cache)


def _verify_one_image(nc: int) -> Callable[[Path], tuple]:
    return lambda image: _verify_one((image, nc))


def scan_entries(entries: list, verify: Callable[[Any], tuple], files_of: Callable[[Any], tuple], salt: str,
                 workers: int = 2, use_cache: bool = True, unit: str = "lines",
                 fmt: str = "yolo") -> tuple[SplitLabels, bool]:
    """Verify a split of any format -> ``(SplitLabels, loaded from cache)``.

    ``verify(entry)`` returns ``(ImageLabels or None, messages, dropped, corrupt reason or None)``; ``files_of(entry)``
    the files it reads, the image first (their paths, sizes and modification times, with ``salt``, key the cache).
    """
    h = hashlib.sha256(f"v{CACHE_VERSION} {salt}".encode())
    for entry in entries:
        _stat_lines(h, files_of(entry))
    digest = h.hexdigest()
    ends = [files_of(e)[0] for e in entries[:1] + entries[-1:]]
    prefix = "" if fmt == "yolo" else f"{fmt}\n"  # the same images read as YOLO and as VOC are two caches
    key = hashlib.sha256((prefix + "\n".join(map(str, ends))).encode() + str(len(entries)).encode())
    cache_file = cache_dir() / "labels" / f"{key.hexdigest()[:24]}.json"
    if use_cache and cache_file.is_file():
        try:
            d = json.loads(cache_file.read_text())
            if d.get("hash") == digest:
                return SplitLabels.from_json(d), True
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable or stale cache: rescan
    with ThreadPoolExecutor(max(1, workers)) as pool:  # PIL decodes without the GIL
        results = list(pool.map(verify, entries, chunksize=16))
    out = SplitLabels([], unit=unit)
    for entry, (labels, messages, dropped, reason) in zip(entries, results):
        if reason is not None:
            out.corrupt.append((str(files_of(entry)[0]), reason))
            continue
        out.items.append(labels)
        out.messages.extend(messages)
        out.dropped += dropped
    if use_cache:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"hash": digest, **out.to_json()}))
            os.replace(tmp, cache_file)
        except OSError as e:  # a read-only home must not stop training
            LOGGER.warning(f"label cache not written ({cache_file}: {e.strerror})")
    return out, False


def data_format(data: dict) -> str:
    """``yolo``, ``voc`` or ``coco``: how ``data`` (from :func:`load_data`) stores its labels."""
    return str(data.get("format") or "yolo").lower()


def scan_data_split(data: dict, split: str, workers: int = 2, use_cache: bool = True) -> tuple[SplitLabels, bool]:
    """Read and verify ``data[split]`` in whatever format ``data`` has -> ``(SplitLabels, loaded from cache)``."""
    fmt = data_format(data)
    if fmt == "voc":
        from vistrain.data.voc import scan_voc_split

        return scan_voc_split(data, split, workers=workers, use_cache=use_cache)
    if fmt == "coco":
        from vistrain.data.coco import scan_coco_split

        return scan_coco_split(data, split, workers=workers, use_cache=use_cache)
    return scan_split(list_split_images(data, split), data["nc"], workers=workers, use_cache=use_cache)
