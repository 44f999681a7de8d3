"""COCO instances JSON datasets (``instances_train2017.json`` and the like), read as they are.

``data=`` names the JSON (its val twin is found by swapping ``train`` for ``val`` in the name), a folder holding
``annotations/instances_*train*.json`` and ``...val...json``, or a dataset YAML whose ``train`` / ``val`` are JSON
files relative to ``path`` (``format: coco``, implied by the ``.json`` names).  Each image entry's ``file_name`` is
looked up in the YAML's ``images:`` folder (a path, or one per split ``{train: ..., val: ...}``) if given, else in the
JSON's folder, an ``images/`` folder beside it, the YAML's ``path`` and ``path/images``, and below each of these in
the split's folder (``instances_val2017.json`` -> ``val2017/``), the layouts COCO and ultralytics use.

Classes: the categories in the order of their ids, numbered 0..N-1; names from the categories (or the YAML's
``names``, one per category).  Boxes: ``bbox`` (x, y of the top-left corner, width, height in pixels) ->
normalised cx, cy, w, h of the image's real size.  Segmentation: polygons (several parts are joined into one
outline by zero-width bridges, as ultralytics' converter does) or RLE (non-crowd; decoded with pycocotools and
traced with OpenCV), stored as YOLO polygons with pixel-centre vertices.  ``iscrowd`` objects are skipped, as
ultralytics' converter skips them.  Each object is verified as a YOLO label line is: a problem drops that object
with ``file: image NAME: object N: what is wrong``.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np

from vistrain.data.image import BadImageError
from vistrain.data.yolo import (COORD_TOL, DataYAMLError, ImageLabels, SplitLabels, _row_geometry, image_shape,
                                scan_entries)

LOGGER = logging.getLogger("vistrain")
_JSON_CACHE: dict[tuple, dict] = {}  # the last JSON read (categories, then the scan of that split), by path + stat


# ------------------------------------------------------------------------------------ dataset
def coco_folder_jsons(folder: str | Path) -> list[Path]:
    """``[train JSON, val JSON]`` of a COCO folder (``annotations/*.json`` or ``*.json``; ``instances_*`` first), or
    ``[]`` if it has no such pair."""
    folder = Path(folder)
    found = [p for d in (folder / "annotations", folder) if d.is_dir() for p in sorted(d.glob("*.json"))]
    found.sort(key=lambda p: not p.name.startswith("instances"))
    train = [p for p in found if "train" in p.stem.lower()]
    val = [p for p in found if "val" in p.stem.lower()]
    return [train[0], val[0]] if train and val else []


def load_coco_json_data(train_json: str | Path, val_json: str | Path | None = None) -> dict:
    """The dataset of one COCO JSON (with its ``train``/``val`` twin if there is one) or of a train and val JSON."""
    train_json = Path(train_json).expanduser().resolve()
    if val_json is None:
        name, val_json = train_json.name, train_json
        twin = name.replace("train", "val") if "train" in name else name.replace("val", "train")
        if twin != name and (train_json.parent / twin).is_file():
            pair = (train_json, train_json.parent / twin)
            train_json, val_json = pair if "train" in name else pair[::-1]
        else:
            LOGGER.warning(f"data={train_json}: no val JSON beside it (its name with 'train' -> 'val'): "
                           f"validating on the training images")
    data = {"format": "coco", "path": str(train_json.parent), "train": str(train_json), "val": str(Path(val_json)),
            "yaml_file": str(train_json)}
    return complete_coco_data(data)


def _split_jsons(data: dict, split: str) -> list[Path]:
    spec = data.get(split)
    if spec in (None, ""):
        raise DataYAMLError(f"{data.get('yaml_file', 'data')}: no '{split}' split")
    out = []
    for entry in spec if isinstance(spec, (list, tuple)) else [spec]:
        p = Path(str(entry)).expanduser()
        p = p if p.is_absolute() else Path(data["path"]) / p
        if not p.is_file():
            raise DataYAMLError(f"{data.get('yaml_file', 'data')}: {split}: {p} does not exist (a COCO dataset's "
                                f"splits are instances JSON files)")
        out.append(p)
    return out


def read_coco_json(path: Path) -> dict:
    """A COCO JSON, checked for ``images``, ``annotations`` and ``categories`` lists; the last one read is kept
    until :func:`forget_json` (the categories and then the scan of a split read it once)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key in _JSON_CACHE:
        return _JSON_CACHE[key]
    try:
        d = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise DataYAMLError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    except UnicodeDecodeError:
        raise DataYAMLError(f"{path}: not a text file") from None
    if not isinstance(d, dict):
        raise DataYAMLError(f"{path}: expected a COCO JSON object with images, annotations, categories")
    for key_name in ("images", "annotations", "categories"):
        if not isinstance(d.get(key_name), list):
            raise DataYAMLError(f"{path}: no '{key_name}' list (a COCO instances JSON has images, annotations, "
                                f"categories)")
    _JSON_CACHE.clear()
    _JSON_CACHE[key] = d
    return d


def forget_json() -> None:
    _JSON_CACHE.clear()


def coco_categories(path: Path, d: dict) -> list[tuple[int, str]]:
    """``[(category id, name)]`` sorted by id; duplicate or non-integer ids are an error."""
    cats = {}
    for i, c in enumerate(d["categories"]):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or isinstance(c.get("id"), bool):
            raise DataYAMLError(f"{path}: categories[{i}]: expected {{'id': integer, 'name': ...}}, got {c!r:.80}")
        if c["id"] in cats:
            raise DataYAMLError(f"{path}: category id {c['id']} listed twice")
        cats[c["id"]] = str(c.get("name", c["id"]))
    return sorted(cats.items())


def complete_coco_data(data: dict) -> dict:
    """``data`` with ``category_ids`` (class index -> category id), ``names`` (the categories', or the YAML's given
    one per category) and ``nc``, from the first train JSON."""
    first = _split_jsons(data, "train")[0]
    cats = coco_categories(first, read_coco_json(first))
    if not cats:
        raise DataYAMLError(f"{first}: no categories")
    names = [n for _, n in cats]
    if data.get("names") is not None:
        if len(data["names"]) != len(cats):
            raise DataYAMLError(f"{data['yaml_file']}: names lists {len(data['names'])} classes but {first} has "
                                f"{len(cats)} categories")
        names = list(data["names"])
    return {**data, "names": names, "nc": len(names), "category_ids": [i for i, _ in cats],
            "category_names": [n for _, n in cats]}


def image_folders(data: dict, split: str, json_file: Path) -> list[Path]:
    """Folders where ``file_name``s of ``json_file`` are looked up, in order (existing ones only)."""
    images = data.get("images")
    if isinstance(images, dict):
        images = images.get(split)
    root = Path(data["path"])
    if images:
        p = Path(str(images)).expanduser()
        bases = [p if p.is_absolute() else root / p]
    else:
        bases = [json_file.parent, json_file.parent / "images", root, root / "images"]
        if json_file.parent.name == "annotations":
            bases += [json_file.parent.parent, json_file.parent.parent / "images"]
    stem = json_file.stem.split("instances_", 1)[-1]  # instances_val2017 -> val2017
    out = []
    for b in bases:
        for d in (b, b / stem):
            if d not in out and d.is_dir():
                out.append(d)
    return out


# ------------------------------------------------------------------------------------ geometry
def merge_polygons(polygons: list[np.ndarray]) -> np.ndarray:
    """One outline ``[K, 2]`` of several polygon parts: each part is visited from the vertex of the first part
    nearest to it, there and back along a zero-width bridge, so rasterising it gives the union of the parts."""
    if len(polygons) == 1:
        return polygons[0]
    base, attach = polygons[0], defaultdict(list)
    for part in polygons[1:]:
        d = ((base[:, None, :] - part[None, :, :]) ** 2).sum(-1)
        i, j = np.unravel_index(np.argmin(d), d.shape)
        attach[int(i)].append(np.concatenate([np.roll(part, -int(j), 0), part[j:j + 1]]))
    out = []
    for i, vertex in enumerate(base):
        out.append(vertex[None])
        for loop in attach.get(i, ()):
            out += [loop, vertex[None]]
    return np.concatenate(out).astype(np.float32)


def rle_polygons(rle: dict, h: int, w: int) -> list[np.ndarray]:
    """The outer outlines of an RLE mask (compressed or uncompressed counts) -> polygons ``[K, 2]`` through the
    centres of its edge pixels (pixel (0, 0) is at 0.5, 0.5), parts of fewer than 3 points left out."""
    import cv2
    from pycocotools import mask as mask_utils

    obj = mask_utils.frPyObjects(rle, h, w) if isinstance(rle.get("counts"), list) else rle
    mask = np.ascontiguousarray(mask_utils.decode(obj))
    contours = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[0]
    return [c.reshape(-1, 2).astype(np.float64) + 0.5 for c in contours if len(c) >= 3]


def _polygons(seg, h: int, w: int) -> tuple[list[np.ndarray], str | None]:
    """An annotation's ``segmentation`` -> ``(polygons in pixels, why none could be used)``."""
    if seg in (None, [], {}):
        return [], None
    if isinstance(seg, dict):
        if list(seg.get("size") or []) != [h, w]:
            return [], f"RLE size {seg.get('size')} differs from the {w}x{h} image (size is [height, width])"
        try:
            polys = rle_polygons(seg, h, w)
        except Exception as e:  # pycocotools' errors for bad counts are plain exceptions
            return [], f"RLE not decodable ({type(e).__name__})"
        return polys, None if polys else "empty RLE mask"
    if not isinstance(seg, list):
        return [], f"segmentation of type {type(seg).__name__}"
    polys = []
    for part in seg:
        if isinstance(part, list) and len(part) >= 6 and not len(part) % 2 \
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in part):
            arr = np.asarray(part, np.float64).reshape(-1, 2)
            if np.isfinite(arr).all():
                polys.append(arr)
    return polys, None if polys else "no polygon of at least 3 points"


# ------------------------------------------------------------------------------------ one image
def _verify_image(entry: tuple, class_of: dict[int, int]):
    image, json_file, record, anns, folders = entry
    fn = record.get("file_name")
    if not image.is_file():
        looked = ", ".join(str(f) for f in folders) or "no existing folder"
        return None, [], 0, f"image file not found (file_name '{fn}' in {json_file}; looked in {looked})"
    try:
        h, w = image_shape(image)
    except BadImageError as e:
        return None, [], 0, e.reason
    where = f"{json_file}: image {fn}"
    messages, dropped, objects, seen = [], 0, [], {}
    rw, rh = record.get("width"), record.get("height")
    if isinstance(rw, (int, float)) and isinstance(rh, (int, float)) and rw and rh and (int(rh), int(rw)) != (h, w):
        messages.append(f"{where}: width x height {int(rw)}x{int(rh)} but the image is {w}x{h}: boxes read in the "
                        f"image's size")
    for n, ann in enumerate(anns, 1):
        if ann.get("iscrowd"):
            continue
        problem, bbox = None, ann.get("bbox")
        cid = ann.get("category_id")
        if not isinstance(cid, int) or cid not in class_of:
            problem = f"category id {ann.get('category_id')} not in categories"
        elif not (isinstance(bbox, list) and len(bbox) == 4
                  and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
            problem = f"bbox {bbox!r:.60} is not 4 numbers [x, y, width, height]"
        elif not np.isfinite(bbox).all():
            problem = "non-finite bbox value"
        elif bbox[2] <= 0 or bbox[3] <= 0:
            problem = f"bbox width or height <= 0 ({bbox[2]:g} x {bbox[3]:g})"
        if problem is None:
            c = class_of[cid]
            key = (c, *map(float, bbox))
            problem = f"duplicate of object {seen[key]}" if key in seen else None
            seen.setdefault(key, n)
        if problem is None:
            x, y, bw, bh = map(float, bbox)
            geometry = _row_geometry(np.array([(x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h]))
            problem = geometry if isinstance(geometry, str) else None
        if problem is not None:
            messages.append(f"{where}: object {n}: {problem}: dropped")
            dropped += 1
            continue
        box, _, clipped = geometry
        if clipped:
            messages.append(f"{where}: object {n}: bbox outside the {w}x{h} image: clipped to the image")
        polys, why = _polygons(ann.get("segmentation"), h, w)
        poly = np.zeros((0, 2), np.float32)
        if polys:
            poly = merge_polygons(polys) / np.array([w, h])
            if (poly < -COORD_TOL).any() or (poly > 1 + COORD_TOL).any():
                messages.append(f"{where}: object {n}: polygon outside the {w}x{h} image: clipped to the image")
            poly = poly.clip(0, 1).astype(np.float32)
        elif why:
            messages.append(f"{where}: object {n}: segmentation unusable ({why}): box only")
        objects.append((c, box, poly, n))
    cls = np.array([o[0] for o in objects], np.int64)
    boxes = np.stack([o[1] for o in objects]).astype(np.float32) if objects else np.zeros((0, 4), np.float32)
    labels = ImageLabels(str(image), (h, w), cls, boxes, [o[2] for o in objects], None, where,
                         np.array([o[3] for o in objects], np.int64))
    return labels, messages, dropped, None


def _json_entries(data: dict, split: str, json_file: Path, d: dict) -> tuple[list[tuple], list[str], int, int]:
    """``(entries for the scan, messages, objects dropped, crowd objects)`` of one JSON: annotations whose image
    is not listed are dropped here; the rest go with their image."""
    first = dict(zip(data["category_ids"], data["category_names"]))
    for cid, name in coco_categories(json_file, d):
        if cid in first and name != first[cid]:
            raise DataYAMLError(f"{json_file}: category {cid} is '{name}' here but '{first[cid]}' in "
                                f"{_split_jsons(data, 'train')[0]}; the splits must share their categories")
    anns, messages, dropped, crowd = defaultdict(list), [], 0, 0
    images = {}
    for i, rec in enumerate(d["images"]):
        if isinstance(rec, dict) and "id" in rec and isinstance(rec.get("file_name"), str):
            images.setdefault(rec["id"], rec)
        else:
            messages.append(f"{json_file}: images[{i}]: no id or file_name: skipped")
    for k, ann in enumerate(d["annotations"]):
        if not isinstance(ann, dict) or ann.get("image_id") not in images:
            got = ann.get("image_id") if isinstance(ann, dict) else ann
            messages.append(f"{json_file}: annotations[{k}]: image_id {got!r:.40} not in images: dropped")
            dropped += 1
            continue
        crowd += bool(ann.get("iscrowd"))
        anns[ann["image_id"]].append(ann)
    folders = image_folders(data, split, json_file)
    found = {i: next((f / r["file_name"] for f in folders if (f / r["file_name"]).is_file()), None)
             for i, r in images.items()}
    homes = [f for f in folders if any(p is not None and str(p).startswith(str(f / "")) for p in found.values())]
    home = homes[-1] if homes else folders[0] if folders else json_file.parent  # where a missing image should be
    entries, seen = [], {}
    for image_id, rec in images.items():
        fn = rec["file_name"]
        path = found[image_id] or home / fn
        if path in seen:
            messages.append(f"{json_file}: image id {image_id}: file_name '{fn}' already listed by image id "
                            f"{seen[path]}: skipped")
            continue
        seen[path] = image_id
        entries.append((path, json_file, rec, anns.get(image_id, []), folders))
    return entries, messages, dropped, crowd


def scan_coco_split(data: dict, split: str, workers: int = 2, use_cache: bool = True) -> tuple[SplitLabels, bool]:
    """Verify the images and annotations of ``data[split]`` (one JSON or a list) -> ``(SplitLabels, loaded from
    cache)``; a missing or unreadable image is skipped and counted as corrupt, the reason naming it."""
    class_of = {cid: i for i, cid in enumerate(data["category_ids"])}
    entries, messages, dropped, crowd, salt = [], [], 0, 0, [f"coco categories={data['category_ids']}"]
    for json_file in _split_jsons(data, split):
        d = read_coco_json(json_file)
        e, m, n, c = _json_entries(data, split, json_file, d)
        entries, messages, dropped, crowd = entries + e, messages + m, dropped + n, crowd + c
        st = json_file.stat()
        salt.append(f"{json_file}|{st.st_size}|{st.st_mtime_ns}")
    forget_json()
    labels, cached = scan_entries(entries, lambda entry: _verify_image(entry, class_of), lambda entry: entry[:1],
                                  " ".join(salt), workers=workers, use_cache=use_cache, unit="objects", fmt="coco")
    labels.messages[:0] = messages  # problems of the JSON itself, found again on every read (not cached)
    labels.dropped += dropped
    if crowd:
        labels.notes.append(f"{crowd} crowd objects (iscrowd=1) skipped, as ultralytics' COCO converter skips them")
    return labels, cached
