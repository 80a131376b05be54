"""PASCAL VOC XML annotations -> a COCO instances dict.

Two layouts are recognised:

* the VOC release layout ``folder/Annotations/*.xml`` + ``folder/JPEGImages/*``
  (optionally restricted to ``folder/ImageSets/Main/<image_set>.txt``);
* a flat folder with each ``name.xml`` next to its image (what labelImg writes).

Conventions of the conversion:

* **Coordinates.** VOC stores 1-based, inclusive pixel indices. A box covering pixel columns
  ``xmin..xmax`` (1-based) covers ``[xmin - 1, xmax)`` in the 0-based continuous coordinates
  COCO uses, so ``x = xmin - 1`` and ``w = xmax - xmin + 1`` (same for y). Boxes are clipped to
  the image; boxes empty after clipping are dropped, counted and logged.
* **Image size.** The size of the image file itself (as displayed, EXIF orientation applied) is
  authoritative. ``<size>`` is only used when the image cannot be read; a missing ``<size>`` or
  one of ``0 x 0`` (common in exported data) is therefore harmless.
* **Image lookup.** ``<filename>`` is tried first, then any image with the XML's stem.
  Formats are sniffed from content, so a ``.jpg`` holding PNG data is fine.
* **Difficult objects** stay normal annotations and carry ``"difficult": 1``. With
  ``difficult_as_crowd=True`` they also get ``iscrowd=1``, which makes COCO evaluation ignore
  them (neither true nor false positive, as VOC's own protocol does) and training drop them.
* **Classes.** ``class_names=None`` takes the sorted set of names found; a fixed list makes an
  unknown name an error naming the XML file. Category ids are ``1..C`` in list order.
* ``area`` is the box area (VOC has no masks).
* **Bad files.** By default the first unusable XML file stops the conversion with
  :class:`BadAnnotationError` naming it. With ``skip_bad=True`` such a file is left out (its
  image with it) and listed with the reason, and the rest is converted.

Conversion counts are stored under ``d["info"]["conversion"]``, the files left out under
``d["info"]["conversion"]["skipped_files"]`` as ``{"file", "reason"}`` objects.
"""

from __future__ import annotations

import json
import logging
import math
import os
import xml.etree.ElementTree as ET
from typing import List, Optional, Sequence, Tuple

from ..errors import UserInputError
from ..io_utils import atomic_write
from .errors import BadAnnotationError, BadImageError, PathLike
from .image_io import read_image_size

__all__ = ["voc_to_coco", "write_coco_json", "IMAGE_EXTENSIONS"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif",
                    ".JPG", ".JPEG", ".PNG")


def _find_layout(folder: str, image_set: Optional[str]) -> Tuple[List[str], str]:
    """Return (xml paths, image directory)."""
    ann_dir = os.path.join(folder, "Annotations")
    if os.path.isdir(ann_dir):
        image_dir = os.path.join(folder, "JPEGImages")
        if image_set is not None:
            list_file = os.path.join(folder, "ImageSets", "Main", f"{image_set}.txt")
            if not os.path.isfile(list_file):
                raise UserInputError(f"{list_file}: no such image set file (image_set {image_set!r})")
            with open(list_file, "r", encoding="utf-8") as f:
                stems = [line.split()[0] for line in f if line.strip()]
            return [os.path.join(ann_dir, f"{s}.xml") for s in stems], image_dir
        xmls = sorted(os.path.join(ann_dir, n) for n in os.listdir(ann_dir) if n.lower().endswith(".xml"))
        return xmls, image_dir
    if image_set is not None:
        raise UserInputError(f"image_set={image_set!r} needs the VOC layout (folder/Annotations, "
                         f"folder/ImageSets/Main), not found in {folder!r}")
    xmls = sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.lower().endswith(".xml"))
    return xmls, folder


def _find_image(xml_path: str, filename: Optional[str], image_dir: str) -> Optional[str]:
    candidates = []
    if filename:
        # Only the base name: exported XMLs often hold absolute paths from another machine.
        candidates.append(os.path.join(image_dir, os.path.basename(filename.replace("\\", "/"))))
    stem = os.path.splitext(os.path.basename(xml_path))[0]
    candidates.extend(os.path.join(image_dir, stem + ext) for ext in IMAGE_EXTENSIONS)
    for path in candidates:
        if os.path.isfile(path):
            return path
    return None


def _number(node: ET.Element, tag: str, xml_path: str) -> float:
    text = node.findtext(tag)
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise BadAnnotationError(xml_path, f"<{tag}> is {text!r}, not a number") from None
    if not math.isfinite(value):
        raise BadAnnotationError(xml_path, f"<{tag}> is {text!r}, not a finite number")
    return value


def _xml_size(root: ET.Element) -> Tuple[int, int]:
    size = root.find("size")
    if size is None:
        return 0, 0
    try:
        return int(float(size.findtext("width"))), int(float(size.findtext("height")))
    except (TypeError, ValueError):
        return 0, 0


def _parse_annotation(xml_path: str, *, folder: str, image_dir: str,
                      class_names: Optional[Sequence[str]], image_set: Optional[str],
                      counts: dict) -> tuple:
    """``(xml_path, image file_name, width, height, objects)`` of one VOC XML file, objects as
    ``(name, x1, y1, x2, y2, difficult)`` in 0-based continuous coordinates (not clipped).
    Raises :class:`BadAnnotationError` naming the file; ``counts`` is only updated once the
    whole file has been read."""
    if not os.path.isfile(xml_path):
        raise BadAnnotationError(xml_path, f"annotation file missing (listed in image_set {image_set!r})")
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise BadAnnotationError(xml_path, f"malformed XML: {exc}") from exc
    objects = []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise BadAnnotationError(xml_path, "<object> without a <name>")
        if class_names is not None and name not in class_names:
            raise BadAnnotationError(xml_path, f"unknown class {name!r}; expected one of {class_names}")
        box = obj.find("bndbox")
        if box is None:
            raise BadAnnotationError(xml_path, f"<object> {name!r} without <bndbox>")
        xmin, ymin, xmax, ymax = (_number(box, t, xml_path) for t in ("xmin", "ymin", "xmax", "ymax"))
        difficult = (obj.findtext("difficult") or "0").strip() in ("1", "true", "True")
        objects.append((name, xmin - 1.0, ymin - 1.0, xmax, ymax, difficult))
    image_path = _find_image(xml_path, root.findtext("filename"), image_dir)
    width = height = 0
    if image_path is not None:
        try:
            width, height = read_image_size(image_path)
        except BadImageError as exc:
            logger.warning("%s: cannot read size of %s (%s); using <size>", xml_path, image_path, exc.reason)
    else:
        logger.warning("%s: image file not found (filename %r)", xml_path, root.findtext("filename"))
    from_image = width > 0 and height > 0
    if not from_image:
        width, height = _xml_size(root)
        if width <= 0 or height <= 0:
            raise BadAnnotationError(xml_path, "image size unknown: image unreadable or missing "
                                               "and <size> absent or 0x0")
    counts["size_from_image" if from_image else "size_from_xml"] += 1
    counts["missing_images"] += int(image_path is None)
    rel = os.path.relpath(image_path, folder) if image_path is not None else os.path.relpath(
        os.path.join(image_dir, os.path.basename(root.findtext("filename") or "")), folder)
    return xml_path, rel.replace(os.sep, "/"), width, height, objects


def voc_to_coco(
    folder: PathLike,
    *,
    class_names: Optional[Sequence[str]] = None,
    difficult_as_crowd: bool = False,
    image_set: Optional[str] = None,
    skip_bad: bool = False,
) -> dict:
    """Convert a VOC-style folder into a COCO instances dict (conventions in the module doc).

    ``file_name`` entries are relative to ``folder``, so use ``folder`` as the dataset's
    ``image_root``. Images are numbered ``1..N`` in sorted XML order.

    Args:
        skip_bad: leave out XML files that cannot be converted, listing them under
            ``d["info"]["conversion"]["skipped_files"]``, instead of raising on the first.

    Raises:
        UserInputError: ``folder`` is not a directory, ``class_names`` is empty or has
            duplicates, ``image_set`` cannot be found.
        BadAnnotationError: malformed XML, an object without a name or box, an unknown class
            with a fixed ``class_names``, an image whose size can be found neither in the file
            nor in the XML (unless ``skip_bad``); a folder without any XML, or without any
            convertible one.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise UserInputError(f"{folder}: not an existing directory")
    if class_names is not None:
        class_names = [str(n) for n in class_names]
        if not class_names or len(set(class_names)) != len(class_names):
            raise UserInputError(f"class_names must be non-empty and unique, got {class_names!r}")
    xml_paths, image_dir = _find_layout(folder, image_set)
    if not xml_paths:
        raise BadAnnotationError(folder, "no .xml annotation files found")

    counts = {"images": 0, "objects": 0, "difficult": 0, "clipped_boxes": 0,
              "dropped_empty_boxes": 0, "size_from_image": 0, "size_from_xml": 0,
              "missing_images": 0}
    parsed, skipped = _parse_all(xml_paths, folder=folder, image_dir=image_dir,
                                 class_names=class_names, image_set=image_set, counts=counts,
                                 skip_bad=skip_bad)
    found_names = {obj[0] for record in parsed for obj in record[4]}
    names = list(class_names) if class_names is not None else sorted(found_names)
    if not names:
        raise BadAnnotationError(folder, "no objects found, so no class names (pass class_names)")
    cat_ids = {name: i + 1 for i, name in enumerate(names)}
    images, annotations = [], []
    for image_id, (xml_path, rel, width, height, objects) in enumerate(parsed, start=1):
        images.append({"id": image_id, "file_name": rel, "width": width, "height": height})
        for name, *box, difficult in objects:
            bbox = _clipped_xywh(box, width, height, counts)
            if bbox is None:
                logger.warning("%s: dropping empty box %r for %r in a %dx%d image", xml_path,
                               (box[0] + 1, box[1] + 1, box[2], box[3]), name, width, height)
                continue
            counts["objects"] += 1
            counts["difficult"] += int(difficult)
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": cat_ids[name],
                "bbox": bbox,
                "area": bbox[2] * bbox[3],
                "iscrowd": int(difficult and difficult_as_crowd),
                "difficult": int(difficult),
            })
    counts["images"] = len(images)
    counts["skipped_files"] = skipped
    return {
        "info": {"description": f"converted from PASCAL VOC XML in {folder}", "conversion": counts},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cat_ids[n], "name": n, "supercategory": "none"} for n in names],
    }


def _parse_all(xml_paths: Sequence[str], *, folder: str, image_dir: str,
               class_names: Optional[Sequence[str]], image_set: Optional[str], counts: dict,
               skip_bad: bool) -> tuple[list, list]:
    """``(parsed records, skipped files)`` of :func:`_parse_annotation` over ``xml_paths``; a
    bad file raises, or with ``skip_bad`` is listed as ``{"file", "reason"}`` and left out."""
    parsed, skipped = [], []
    for xml_path in xml_paths:
        try:
            parsed.append(_parse_annotation(xml_path, folder=folder, image_dir=image_dir,
                                            class_names=class_names, image_set=image_set,
                                            counts=counts))
        except BadAnnotationError as exc:
            if not skip_bad:
                raise
            logger.warning("skipping %s: %s", exc.path, exc.reason)
            skipped.append({"file": exc.path, "reason": exc.reason})
    if not parsed:
        raise BadAnnotationError(folder, f"none of the {len(xml_paths)} .xml files could be "
                                         f"converted; first: {skipped[0]['file']}: "
                                         f"{skipped[0]['reason']}")
    return parsed, skipped


def _clipped_xywh(box: Sequence[float], width: int, height: int, counts: dict
                  ) -> Optional[list[float]]:
    """``[x, y, w, h]`` of the ``(x1, y1, x2, y2)`` box clipped to the image, or ``None`` if
    nothing is left; counts clipped and dropped boxes."""
    x1, y1, x2, y2 = box
    cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
    cx2, cy2 = min(max(x2, 0.0), width), min(max(y2, 0.0), height)
    if cx2 <= cx1 or cy2 <= cy1:
        counts["dropped_empty_boxes"] += 1
        return None
    if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
        counts["clipped_boxes"] += 1
    return [cx1, cy1, cx2 - cx1, cy2 - cy1]


def write_coco_json(data: dict, path: PathLike) -> str:
    """Write ``data`` as JSON to ``path`` atomically (:func:`libra_rcnn.io_utils.atomic_write`:
    temporary file in the same folder, fsync, ``os.replace``), so readers never see a
    half-written file. Returns the path."""
    path = os.fspath(path)
    atomic_write(path, lambda f: json.dump(data, f), binary=False, encoding="utf-8")
    return path
