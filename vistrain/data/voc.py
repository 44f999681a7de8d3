"""Pascal VOC datasets: the ``VOCdevkit/VOC2007`` layout read as it is.

::

    VOC2007/
      Annotations/<id>.xml          # <size>, then <object>s: <name>, <difficult>, <bndbox> xmin ymin xmax ymax
      JPEGImages/<id>.jpg
      ImageSets/Main/{train,val,test,trainval}.txt   # one image id per line

``data=`` names the folder (found by ``Annotations/`` + ``JPEGImages/``; splits ``ImageSets/Main/train.txt`` and
``val.txt``, ``test.txt`` when there is one), or a dataset YAML with ``format: voc`` whose ``train`` / ``val`` /
``test`` are list files (or lists of them) relative to ``path``.  A list file at ``ROOT/ImageSets/Main/x.txt`` reads
its images and annotations from ``ROOT`` (so VOC2007 and VOC2012 lists can be mixed); the YAML keys ``images`` and
``annotations`` (default ``JPEGImages``, ``Annotations``) name other folders.  Class names: the YAML's ``names``,
else the sorted ``<name>``s of the train split's XML files.

VOC boxes are 1-based inclusive pixel indices.  Like the YOLO labels of the built-in data they become the box
through the centres of the edge pixels: ``cx = (xmin + xmax - 1) / 2 / W``, ``w = (xmax - xmin) / W`` (the image's
real size; a ``<size>`` that differs is reported).  Each object is verified as a YOLO label line is: a problem
drops that object with ``file: object N: what is wrong``; an XML file that does not parse skips its image.
``<difficult>1</difficult>`` objects are kept with ``ImageLabels.difficult`` set; the detect task leaves them out
of training unless ``difficult=True``.
"""

from __future__ import annotations

import logging
import random
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from vistrain.data.image import BadImageError, is_image_file
from vistrain.data.yolo import (DataYAMLError, ImageLabels, SplitLabels, _row_geometry, image_shape, scan_entries)

LOGGER = logging.getLogger("vistrain")
SPLITS = ("train", "val", "test", "trainval")
_BOX_KEYS = ("xmin", "ymin", "xmax", "ymax")


class BrokenXMLError(ValueError):
    """An annotation file that cannot be read as a VOC annotation; ``str(e)`` names the file."""


def is_voc_root(folder: str | Path) -> bool:
    """True if ``folder`` holds ``Annotations/`` and ``JPEGImages/`` (a ``VOCdevkit/VOC20xx`` folder)."""
    folder = Path(folder)
    return (folder / "Annotations").is_dir() and (folder / "JPEGImages").is_dir()


# ------------------------------------------------------------------------------------ dataset
def load_voc_folder(folder: str | Path) -> dict:
    """The dataset of a VOC folder: splits from ``ImageSets/Main/{train,val,test}.txt``, class names from the
    train split's XML files."""
    folder = Path(folder).expanduser().resolve()
    main = folder / "ImageSets" / "Main"
    missing = [s for s in ("train", "val") if not (main / f"{s}.txt").is_file()]
    if missing:
        raise DataYAMLError(f"data={folder}: a Pascal VOC folder without ImageSets/Main/{missing[0]}.txt; write the "
                            f"split lists with `vistrain data split data={folder} trainval=0.9 train=0.9 seed=0`")
    data = {"format": "voc", "path": str(folder), "yaml_file": str(folder),
            **{s: f"ImageSets/Main/{s}.txt" for s in ("train", "val", "test") if (main / f"{s}.txt").is_file()}}
    return complete_voc_data(data)


def complete_voc_data(data: dict) -> dict:
    """``data`` (``path`` absolute) with ``names`` and ``nc``: the given names, else those of the train split."""
    if data.get("names") is None:
        xmls = [xml for _, xml in voc_split_files(data, "train")]
        names = voc_class_names(xmls)
        if not names:
            raise DataYAMLError(f"{data['yaml_file']}: no names given and no <object><name> in the train split's "
                                f"{len(xmls)} XML files; add names: [...]")
        LOGGER.info(f"data: class names from the <name>s in the train split's {len(xmls)} XML files, sorted "
                    f"({len(names)}): {', '.join(names)}")
        data = {**data, "names": names}
    return {**data, "nc": len(data["names"])}


def voc_class_names(xml_files: list[Path]) -> list[str]:
    """The sorted set of ``<object><name>``s in ``xml_files`` (files that do not parse are left to the scan)."""
    names = set()
    for xml in xml_files:
        try:
            root = ET.parse(xml).getroot()
        except (ET.ParseError, OSError):
            continue
        names.update(n for n in ((o.findtext("name") or "").strip() for o in root.findall("object")) if n)
    return sorted(names)


def _folder(root: Path, data: dict, key: str, default: str) -> Path:
    p = Path(str(data.get(key) or default)).expanduser()
    return p if p.is_absolute() else root / p


def _list_root(list_file: Path, data: dict) -> Path:
    """The VOC folder a list file belongs to: ``ROOT/ImageSets/Main/x.txt`` -> ``ROOT``, else the data's path."""
    if list_file.parent.name == "Main" and list_file.parent.parent.name == "ImageSets":
        return list_file.parent.parent.parent
    return Path(data["path"])


def voc_split_files(data: dict, split: str) -> list[tuple[Path, Path]]:
    """``(image, annotation XML)`` of every id listed for ``split``, in list order, without repeats.  An entry is a
    list file of ids, a VOC folder (its ``ImageSets/Main/<split>.txt``), or a list of these; an image not found
    keeps its expected path (``JPEGImages/<id>.jpg``) and is reported when scanned."""
    spec = data.get(split)
    if spec in (None, ""):
        raise DataYAMLError(f"{data.get('yaml_file', 'data')}: no '{split}' split")
    out, seen = [], set()
    for entry in spec if isinstance(spec, (list, tuple)) else [spec]:
        p = Path(str(entry)).expanduser()
        p = p if p.is_absolute() else Path(data["path"]) / p
        if p.is_dir() and is_voc_root(p):
            p = p / "ImageSets" / "Main" / f"{split}.txt"
        if not p.is_file():
            raise DataYAMLError(f"{data.get('yaml_file', 'data')}: {split}: {p} does not exist (give an ImageSets/Main "
                                f"list of image ids, or write one with `vistrain data split`)")
        root = _list_root(p, data)
        images, annotations = _folder(root, data, "images", "JPEGImages"), _folder(root, data, "annotations",
                                                                                   "Annotations")
        stems = None
        for line in p.read_text(encoding="utf-8-sig", errors="replace").splitlines():
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            image_id = fields[0]
            image = images / f"{image_id}.jpg"
            if not image.is_file():
                if stems is None:  # other image types: look them up once per folder
                    stems = {f.stem: f for f in sorted(images.iterdir()) if is_image_file(f)} if images.is_dir() else {}
                image = stems.get(image_id, image)
            if image not in seen:
                seen.add(image)
                out.append((image, annotations / f"{image_id}.xml"))
    return out


# ------------------------------------------------------------------------------------ one annotation
def _number(obj: ET.Element, key: str) -> float | None:
    try:
        return float((obj.findtext(key) or "").strip())
    except ValueError:
        return None


def _size_message(xml: Path, root: ET.Element, shape: tuple[int, int]) -> str | None:
    """A message if the XML's ``<size>`` differs from the real image ``shape`` (h, w); a missing or zero size is
    common in exported files and says nothing."""
    size = root.find("size")
    if size is None:
        return None
    w, h = _number(size, "width"), _number(size, "height")
    if not w or not h or (int(h), int(w)) == tuple(shape):
        return None
    hint = " (EXIF rotation?)" if (int(w), int(h)) == tuple(shape) else ""
    return (f"{xml}: <size> {int(w)}x{int(h)} but the image is {shape[1]}x{shape[0]}{hint}: boxes read in the "
            f"image's size")


def parse_voc_xml(xml: Path, class_index: dict[str, int],
                  shape: tuple[int, int]) -> tuple[list[tuple], list[str], int]:
    """One annotation file -> ``(objects [(cls, box cx cy w h, difficult, object number)], messages, dropped)``.

    ``shape`` is the image's real (h, w), which normalises the boxes.  Raises :class:`BrokenXMLError` for a file
    that does not parse or is not a VOC annotation."""
    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError as e:
        raise BrokenXMLError(f"annotation {xml}: not valid XML ({e})") from None
    except FileNotFoundError:
        raise BrokenXMLError(f"annotation {xml}: file does not exist") from None
    except OSError as e:
        raise BrokenXMLError(f"annotation {xml}: unreadable ({e.strerror})") from None
    if root.tag != "annotation":
        raise BrokenXMLError(f"annotation {xml}: root element <{root.tag}>, expected <annotation>")
    h, w = shape
    messages = [m for m in [_size_message(xml, root, shape)] if m]
    objects, dropped, seen = [], 0, {}
    for n, obj in enumerate(root.findall("object"), 1):
        problem, name = None, (obj.findtext("name") or "").strip()
        box = obj.find("bndbox")
        coords = [_number(box, k) for k in _BOX_KEYS] if box is not None else []
        if not name:
            problem = "no <name>"
        elif name not in class_index:
            problem = f"class '{name}' not in names"
        elif box is None:
            problem = "no <bndbox>"
        elif any(c is None for c in coords):
            problem = f"<{_BOX_KEYS[[c is None for c in coords].index(True)]}> missing or not a number"
        elif not np.isfinite(coords).all():
            problem = "non-finite coordinate"
        if problem is None:
            key = (name, *coords)
            if key in seen:
                problem = f"duplicate of object {seen[key]}"
            seen.setdefault(key, n)
        if problem is None:
            x1, y1, x2, y2 = coords  # 1-based pixel indices; their centres are at index - 0.5
            geometry = _row_geometry(np.array([(x1 + x2 - 1) / 2 / w, (y1 + y2 - 1) / 2 / h, (x2 - x1) / w,
                                               (y2 - y1) / h]))
            if isinstance(geometry, str):
                problem = geometry
        if problem is not None:
            messages.append(f"{xml}: object {n}: {problem}: dropped")
            dropped += 1
            continue
        box_n, _, clipped = geometry
        if clipped:
            messages.append(f"{xml}: object {n}: box outside the {w}x{h} image: clipped to the image")
        difficult = (obj.findtext("difficult") or "0").strip().lower() in ("1", "true", "yes")
        objects.append((class_index[name], box_n, difficult, n))
    return objects, messages, dropped


def _verify_pair(pair: tuple[Path, Path], class_index: dict[str, int]):
    image, xml = pair
    try:
        shape = image_shape(image)
    except BadImageError as e:
        return None, [], 0, e.reason
    try:
        objects, messages, dropped = parse_voc_xml(xml, class_index, shape)
    except BrokenXMLError as e:
        return None, [], 0, str(e)
    cls = np.array([o[0] for o in objects], np.int64)
    boxes = np.stack([o[1] for o in objects]).astype(np.float32) if objects else np.zeros((0, 4), np.float32)
    labels = ImageLabels(str(image), shape, cls, boxes, [np.zeros((0, 2), np.float32) for _ in objects],
                         np.array([o[2] for o in objects], bool), str(xml), np.array([o[3] for o in objects], np.int64))
    return labels, messages, dropped, None


def scan_voc_split(data: dict, split: str, workers: int = 2, use_cache: bool = True) -> tuple[SplitLabels, bool]:
    """Verify the images and annotations of ``data[split]`` -> ``(SplitLabels, loaded from cache)``; a missing
    image, a missing or broken XML file skips the image (counted as corrupt, the reason naming the file)."""
    pairs = voc_split_files(data, split)
    class_index = {name: i for i, name in enumerate(data["names"])}
    return scan_entries(pairs, lambda pair: _verify_pair(pair, class_index), lambda pair: pair,
                        f"voc names={data['names']}", workers=workers, use_cache=use_cache, unit="objects", fmt="voc")


# ------------------------------------------------------------------------------------ split lists
def write_voc_splits(folder: str | Path, trainval: float = 0.9, train: float = 0.9, seed: int = 0,
                     exist_ok: bool = False) -> dict[str, int]:
    """Write ``ImageSets/Main/{trainval,train,val,test}.txt`` of a VOC folder as the VOC tutorials'
    ``voc_annotation.py`` does: of the ``N`` annotated images (``Annotations/*.xml``, sorted), ``int(N * trainval)``
    drawn at random are trainval, ``int(that * train)`` of them train, the rest of trainval val, the others test.
    Seeded (Python's ``random``), so the same files give the same lists.  Existing lists are only replaced with
    ``exist_ok``.  Returns the count of each list."""
    folder = Path(folder).expanduser()
    if not (folder / "Annotations").is_dir():
        raise DataYAMLError(f"data={folder}: no Annotations/ folder (give a Pascal VOC folder such as "
                            f"VOCdevkit/VOC2007)")
    for name, value in (("trainval", trainval), ("train", train)):
        if not 0.0 <= float(value) <= 1.0:
            raise DataYAMLError(f"{name}={value}: expected a fraction in 0..1")
    ids = sorted(p.stem for p in (folder / "Annotations").iterdir() if p.suffix.lower() == ".xml" and p.is_file())
    if not ids:
        raise DataYAMLError(f"data={folder}: no .xml files in Annotations/")
    main = folder / "ImageSets" / "Main"
    existing = [s for s in ("trainval", "train", "val", "test") if (main / f"{s}.txt").exists()]
    if existing and not exist_ok:
        raise DataYAMLError(f"{main / (existing[0] + '.txt')} exists; exist_ok=True replaces the split lists")
    rng = random.Random(int(seed))
    n_trainval = int(len(ids) * float(trainval))
    chosen = rng.sample(range(len(ids)), n_trainval)
    train_set, trainval_set = set(rng.sample(chosen, int(n_trainval * float(train)))), set(chosen)
    lists: dict[str, list[str]] = {s: [] for s in ("trainval", "train", "val", "test")}
    for i, image_id in enumerate(ids):
        if i in trainval_set:
            lists["trainval"].append(image_id)
            lists["train" if i in train_set else "val"].append(image_id)
        else:
            lists["test"].append(image_id)
    main.mkdir(parents=True, exist_ok=True)
    for name, rows in lists.items():
        (main / f"{name}.txt").write_text("".join(f"{r}\n" for r in rows))
    return {name: len(rows) for name, rows in lists.items()}
