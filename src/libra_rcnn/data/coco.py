"""COCO-format detection dataset with load-time validation.

Label convention: COCO category ids (arbitrary, possibly sparse) map to contiguous labels
``1..C`` in increasing category-id order; ``0`` is reserved for background, as torchvision's
detectors expect. ``class_names[label - 1]`` is the category name.

Box convention: json ``bbox`` is ``[x, y, w, h]`` in pixels of the image *as displayed* (EXIF
orientation applied, see :mod:`libra_rcnn.data.image_io`); targets carry ``(x1, y1, x2, y2)``
absolute pixels clipped to the image.

What is validated when the json is loaded (each problem names the file):

* unreadable / malformed json, a top level without ``images``/``annotations``/``categories``
  lists, image or category entries without integer ids, duplicate image or category ids, an
  empty image list -> :class:`BadAnnotationError`;
* annotations that cannot be used are dropped and counted in :attr:`CocoDetection.stats`
  (``strict=True`` raises instead): unknown image id, unknown category id, malformed or
  non-finite ``bbox``, zero/negative width or height, box entirely outside the image;
  boxes partly outside are clipped and counted (never an error);
* ``file_name`` must stay inside ``image_root`` (no ``..``, no absolute paths) unless
  ``allow_outside_root=True``. The check is lexical, so symlinks placed inside the root (data
  caches such as DVC or git-annex use them) are followed on purpose.

Training targets come from the validated annotations only. Scoring does not: the
:attr:`CocoDetection.coco` object is the annotation file as it is (:func:`ground_truth_coco`), so
``COCOeval`` scores against the untouched file, as the official protocol does; degenerate,
out-of-image and crowd boxes stay in it.

Images are only decoded in ``__getitem__`` / :meth:`CocoDetection.load` (or by
:func:`check_dataset`): a missing, corrupt or too-large image makes ``__getitem__`` return
``None`` and ``load`` a :class:`SkippedImage` record when ``skip_bad=True`` (logged and counted;
:func:`collate_fn` drops both), or raise :class:`BadImageError` when ``skip_bad=False``. Counters
incremented there live in the process that ran it (DataLoader workers keep their own copies);
load-time counts and :func:`check_dataset` are exact.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from ..errors import UserInputError
from .errors import BadAnnotationError, BadImageError, PathLike
from .image_io import DEFAULT_MAX_PIXELS, load_image, read_image_size
from .transforms import image_to_tensor

__all__ = [
    "CocoDetection",
    "SkippedImage",
    "WithSkipped",
    "check_dataset",
    "collate_fn",
    "collate_with_skipped",
    "ground_truth_coco",
    "load_coco_json",
]

logger = logging.getLogger(__name__)

# Load-time counters, always present in ``stats`` (zero when nothing happened).
_STAT_KEYS = (
    "images",
    "annotations",
    "boxes",  # usable boxes kept (crowd included)
    "crowd",
    "clipped_boxes",
    "dropped_unknown_image",
    "dropped_unknown_category",
    "dropped_invalid_bbox",  # malformed, wrong length, NaN/inf
    "dropped_degenerate_box",  # zero/negative width or height
    "dropped_outside_image",  # empty after clipping to the image
    "filled_annotation_ids",  # missing or duplicate annotation ids renumbered
    "images_without_size",  # no usable width/height in the json
    "images_without_proposals",
    "removed_empty_images",
    # runtime (per process)
    "bad_images",
    "size_mismatch",
)


@dataclass(frozen=True)
class SkippedImage:
    """An image left out because it could not be read: its id, its file and why."""

    image_id: int
    path: str
    reason: str


@dataclass
class _ImageRecord:
    image_id: int
    file_name: str
    path: str
    width: Optional[int]
    height: Optional[int]
    boxes: np.ndarray  # float32 [N, 4] xyxy, clipped to (width, height) when known
    labels: np.ndarray  # int64 [N], 1..C
    areas: np.ndarray  # float32 [N]
    iscrowd: np.ndarray  # int64 [N]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_coco_json(ann_file: PathLike) -> dict:
    """Read ``ann_file`` and check the COCO top-level structure.

    Returns the parsed dict. Raises :class:`BadAnnotationError` naming the file if it is missing,
    not UTF-8 JSON, or lacks the ``images``/``annotations``/``categories`` lists.
    """
    if not os.path.isfile(ann_file):
        raise BadAnnotationError(ann_file, "file not found")
    try:
        with open(ann_file, "r", encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise BadAnnotationError(ann_file, f"malformed JSON: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise BadAnnotationError(ann_file, f"not UTF-8 text: {exc}") from exc
    if not isinstance(data, dict):
        raise BadAnnotationError(
            ann_file, f"not a COCO instances file: top level is a {type(data).__name__}, not an object"
        )
    missing = [key for key in ("images", "annotations", "categories") if key not in data]
    if missing:
        raise BadAnnotationError(
            ann_file, f"not a COCO instances file: missing key(s) {', '.join(map(repr, missing))}"
        )
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise BadAnnotationError(ann_file, f"{key!r} must be a list, got {type(data[key]).__name__}")
    return data


def _bbox_is_usable(bbox: Any) -> bool:
    return (isinstance(bbox, (list, tuple)) and len(bbox) == 4
            and all(_is_number(v) and math.isfinite(v) for v in bbox))


def ground_truth_coco(data: dict) -> COCO:
    """A pycocotools ``COCO`` holding an annotation file's content as it is, for scoring.

    Nothing is clipped or dropped for being degenerate, outside its image or crowd: ``COCOeval``
    treats such boxes as the official evaluation of the same file does. Only what pycocotools
    needs to run at all is touched: annotations that are not objects, lack an integer
    ``image_id`` / ``category_id`` or have a ``bbox`` that is not 4 finite numbers cannot be
    scored and are left out; a missing ``iscrowd`` becomes 0, a missing ``area`` the box area,
    and a missing or repeated annotation ``id`` a fresh one. ``data`` is not modified.

    Args:
        data: a parsed COCO instances file (:func:`load_coco_json`).
    """
    annotations = []
    used = {a["id"] for a in data["annotations"] if isinstance(a, dict) and _is_int(a.get("id"))}
    next_id, assigned = max(used, default=0) + 1, set()
    for ann in data["annotations"]:
        if not (isinstance(ann, dict) and _is_int(ann.get("image_id"))
                and _is_int(ann.get("category_id")) and _bbox_is_usable(ann.get("bbox"))):
            continue
        missing_id = not _is_int(ann.get("id")) or ann["id"] in assigned
        if missing_id or "iscrowd" not in ann or not _is_number(ann.get("area")):
            ann = dict(ann)
            ann.setdefault("iscrowd", 0)
            if not _is_number(ann.get("area")):
                ann["area"] = max(float(ann["bbox"][2]), 0.0) * max(float(ann["bbox"][3]), 0.0)
            if missing_id:
                while next_id in used:
                    next_id += 1
                ann["id"] = next_id
                used.add(next_id)
        assigned.add(ann["id"])
        annotations.append(ann)
    coco = COCO()
    coco.dataset = {**data, "annotations": annotations}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


def _first_duplicates(ids: Sequence[int], limit: int = 5) -> List[int]:
    seen, dupes = set(), []
    for i in ids:
        if i in seen and i not in dupes:
            dupes.append(i)
            if len(dupes) == limit:
                break
        seen.add(i)
    return dupes


class CocoDetection(Dataset):
    """COCO instances json + image folder -> ``(image, target)`` samples.

    Args:
        ann_file: COCO instances json.
        image_root: folder ``file_name`` entries are relative to.
        transforms: callable ``(image, target) -> (image, target)`` applied after the image is
            converted to a ``FloatTensor[3, H, W]`` in ``[0, 1]`` (see :mod:`.transforms`).
        train: training mode drops crowd boxes from targets; evaluation keeps them (flagged by
            ``iscrowd``), the COCO object keeps them in both modes.
        proposals_file: ``torch.save``'d dict ``{image_id: Tensor[K, 4 or 5]}`` (xyxy pixels,
            optional score column), loaded with ``weights_only=True``; adds
            ``target["proposals"]`` (and ``target["proposal_scores"]`` for 5 columns).
        allow_outside_root: allow ``file_name`` to point outside ``image_root``.
        max_pixels: refuse images with more pixels (checked before decoding); ``None``: no limit.
        skip_bad: a bad image makes ``__getitem__`` return ``None`` (logged, counted) instead of
            raising :class:`BadImageError`.
        strict: raise :class:`BadAnnotationError` for annotation problems instead of dropping
            and counting them.
        remove_empty: in training, leave out images without any non-crowd box.

    Sample:
        ``image``: ``FloatTensor[3, H, W]`` in ``[0, 1]``;
        ``target``: ``boxes`` ``FloatTensor[N, 4]`` xyxy, ``labels`` ``Int64Tensor[N]`` in
        ``1..C``, ``image_id`` ``int``, ``area`` ``FloatTensor[N]``, ``iscrowd``
        ``Int64Tensor[N]``, ``orig_size`` ``Int64Tensor[2]`` = ``(H, W)`` of the decoded image
        before transforms, and ``proposals`` ``FloatTensor[K, 4]`` when a proposals file is given.
    """

    def __init__(
        self,
        ann_file: PathLike,
        image_root: PathLike,
        *,
        transforms: Optional[Callable] = None,
        train: bool = True,
        proposals_file: Optional[PathLike] = None,
        allow_outside_root: bool = False,
        max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
        skip_bad: bool = True,
        strict: bool = False,
        remove_empty: bool = False,
    ) -> None:
        super().__init__()
        if transforms is not None and not callable(transforms):
            raise ValueError(f"transforms must be callable or None, got {transforms!r}")
        if max_pixels is not None and (isinstance(max_pixels, bool) or not max_pixels > 0):
            raise ValueError(f"max_pixels must be a positive number or None, got {max_pixels!r}")
        if not os.path.isdir(image_root):
            raise UserInputError(f"{os.fspath(image_root)}: image_root is not an existing directory")
        self.ann_file = os.fspath(ann_file)
        self.image_root = os.path.abspath(image_root)
        self.transforms = transforms
        self.train = bool(train)
        self.allow_outside_root = bool(allow_outside_root)
        self.max_pixels = max_pixels
        self.skip_bad = bool(skip_bad)
        self.strict = bool(strict)
        self.stats: Dict[str, int] = {key: 0 for key in _STAT_KEYS}
        # (file, reason) for every annotation-level problem found while loading.
        self.problems: List[Tuple[str, str]] = []
        self._warned_size: set = set()

        data = load_coco_json(self.ann_file)
        self._load_categories(data["categories"])
        images = self._load_images(data["images"])
        annotations = self._load_annotations(data["annotations"], images)
        #: the annotation file as it is (:func:`ground_truth_coco`): what evaluation scores against
        self.coco = ground_truth_coco(data)

        self._records = self._build_records(images, annotations)
        if remove_empty and self.train:
            kept = [r for r in self._records if bool((r.iscrowd == 0).any())]
            self.stats["removed_empty_images"] = len(self._records) - len(kept)
            self._records = kept
            if not self._records:
                raise BadAnnotationError(self.ann_file, "no image has a usable box (remove_empty=True)")
        self.ids: List[int] = [r.image_id for r in self._records]

        self._proposals: Optional[Dict[int, torch.Tensor]] = None
        if proposals_file is not None:
            self._proposals = self._load_proposals(proposals_file)
            self.stats["images_without_proposals"] = sum(
                1 for i in self.ids if i not in self._proposals
            )

    # ------------------------------------------------------------------ loading
    def _problem(self, counter: str, reason: str) -> None:
        """Record a dropped annotation, or raise in strict mode."""
        if self.strict:
            raise BadAnnotationError(self.ann_file, reason)
        self.stats[counter] += 1
        self.problems.append((self.ann_file, reason))

    def _load_categories(self, categories: list) -> None:
        ids, names = [], {}
        for i, cat in enumerate(categories):
            if not isinstance(cat, dict) or not _is_int(cat.get("id")):
                raise BadAnnotationError(self.ann_file, f"categories[{i}] has no integer 'id'")
            ids.append(cat["id"])
            names[cat["id"]] = str(cat.get("name", cat["id"]))
        if not ids:
            raise BadAnnotationError(self.ann_file, "no categories")
        dupes = _first_duplicates(ids)
        if dupes:
            raise BadAnnotationError(self.ann_file, f"duplicate category ids {dupes}")
        ordered = sorted(ids)
        self.cat_id_to_label: Dict[int, int] = {cid: i + 1 for i, cid in enumerate(ordered)}
        self.label_to_cat_id: Dict[int, int] = {i + 1: cid for i, cid in enumerate(ordered)}
        self.class_names: List[str] = [names[cid] for cid in ordered]

    def _load_images(self, images: list) -> Dict[int, dict]:
        if not images:
            raise BadAnnotationError(self.ann_file, "no images (empty dataset)")
        by_id: Dict[int, dict] = {}
        dupes: List[int] = []
        for i, img in enumerate(images):
            if not isinstance(img, dict) or not _is_int(img.get("id")):
                raise BadAnnotationError(self.ann_file, f"images[{i}] has no integer 'id'")
            file_name = img.get("file_name")
            if not isinstance(file_name, str) or not file_name:
                raise BadAnnotationError(self.ann_file, f"image id {img['id']} has no 'file_name'")
            if img["id"] in by_id:
                if len(dupes) < 5:
                    dupes.append(img["id"])
                continue
            by_id[img["id"]] = img
        if dupes:
            raise BadAnnotationError(self.ann_file, f"duplicate image ids {dupes}")
        return by_id

    def _image_path(self, img: dict) -> str:
        path = os.path.normpath(os.path.join(self.image_root, img["file_name"]))
        if not self.allow_outside_root:
            inside = os.path.commonpath([self.image_root, path]) == self.image_root
            if not inside:
                raise BadAnnotationError(
                    self.ann_file,
                    f"image id {img['id']}: file_name {img['file_name']!r} points outside "
                    f"image_root {self.image_root!r} (pass allow_outside_root=True to permit)",
                )
        return path

    @staticmethod
    def _json_size(img: dict) -> Tuple[Optional[int], Optional[int]]:
        width, height = img.get("width"), img.get("height")
        if _is_number(width) and _is_number(height) and width > 0 and height > 0:
            return int(width), int(height)
        return None, None

    def _load_annotations(self, annotations: list, images: Dict[int, dict]) -> List[dict]:
        """Validate, clip (on a copy) and keep the usable annotations, filling missing fields."""
        kept: List[dict] = []
        used_ids: set = {a["id"] for a in annotations if isinstance(a, dict) and _is_int(a.get("id"))}
        next_id = max(used_ids, default=0) + 1
        assigned: set = set()
        self.stats["annotations"] = len(annotations)
        for i, ann in enumerate(annotations):
            where = f"annotations[{i}]"
            if not isinstance(ann, dict):
                self._problem("dropped_invalid_bbox", f"{where} is not an object")
                continue
            if _is_int(ann.get("id")):
                where = f"annotation id {ann['id']}"
            img = images.get(ann.get("image_id")) if _is_int(ann.get("image_id")) else None
            if img is None:
                self._problem("dropped_unknown_image",
                              f"{where}: image_id {ann.get('image_id')!r} is not in 'images'")
                continue
            cat_id = ann.get("category_id")
            if not _is_int(cat_id) or cat_id not in self.cat_id_to_label:
                self._problem("dropped_unknown_category",
                              f"{where}: category_id {cat_id!r} is not in 'categories'")
                continue
            bbox = ann.get("bbox")
            if not _bbox_is_usable(bbox):
                self._problem("dropped_invalid_bbox", f"{where}: bbox {bbox!r} is not 4 finite numbers")
                continue
            x, y, w, h = (float(v) for v in bbox)
            if w <= 0 or h <= 0:
                self._problem("dropped_degenerate_box", f"{where}: bbox {bbox!r} has non-positive size")
                continue
            width, height = self._json_size(img)
            if width is not None:
                x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
                x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
                if x2 <= x1 or y2 <= y1:
                    self._problem("dropped_outside_image",
                                  f"{where}: bbox {bbox!r} lies outside the {width}x{height} image")
                    continue
                if (x1, y1, x2, y2) != (x, y, x + w, y + h):
                    self.stats["clipped_boxes"] += 1
            ann = dict(ann)  # never mutate the caller's dict
            if "iscrowd" not in ann:
                ann["iscrowd"] = 0
            if not _is_number(ann.get("area")):
                ann["area"] = w * h
            ann_id = ann.get("id")
            if not _is_int(ann_id) or ann_id in assigned:
                while next_id in used_ids:
                    next_id += 1
                ann["id"] = next_id
                used_ids.add(next_id)
                self.stats["filled_annotation_ids"] += 1
            assigned.add(ann["id"])
            kept.append(ann)
        return kept

    def _build_records(self, images: Dict[int, dict], annotations: List[dict]) -> List[_ImageRecord]:
        per_image: Dict[int, List[dict]] = {}
        for ann in annotations:
            per_image.setdefault(ann["image_id"], []).append(ann)
        records = []
        for image_id in sorted(images):
            img = images[image_id]
            width, height = self._json_size(img)
            if width is None:
                self.stats["images_without_size"] += 1
            anns = per_image.get(image_id, [])
            boxes = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
            boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
            if width is not None:
                boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
                boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
            iscrowd = np.array([1 if a.get("iscrowd") else 0 for a in anns], dtype=np.int64)
            records.append(_ImageRecord(
                image_id=image_id,
                file_name=img["file_name"],
                path=self._image_path(img),
                width=width,
                height=height,
                boxes=boxes.astype(np.float32),
                labels=np.array([self.cat_id_to_label[a["category_id"]] for a in anns], dtype=np.int64),
                areas=np.array([float(a["area"]) for a in anns], dtype=np.float32),
                iscrowd=iscrowd,
            ))
            self.stats["boxes"] += len(anns)
            self.stats["crowd"] += int(iscrowd.sum())
        self.stats["images"] = len(records)
        return records

    def _load_proposals(self, proposals_file: PathLike) -> Dict[int, torch.Tensor]:
        path = os.fspath(proposals_file)
        if not os.path.isfile(path):
            raise BadAnnotationError(path, "proposals file not found")
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # not a torch file, or holds objects weights_only refuses
            raise BadAnnotationError(path, f"cannot load proposals: {exc}") from exc
        if not isinstance(raw, dict):
            raise BadAnnotationError(path, f"expected a dict {{image_id: Tensor[K, 4 or 5]}}, "
                                           f"got {type(raw).__name__}")
        proposals: Dict[int, torch.Tensor] = {}
        for key, value in raw.items():
            image_id = int(key.item()) if isinstance(key, torch.Tensor) else key
            if not _is_int(image_id):
                raise BadAnnotationError(path, f"proposal key {key!r} is not an integer image id")
            if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.shape[1] not in (4, 5):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise BadAnnotationError(path, f"proposals for image {image_id}: expected Tensor[K, 4 or 5], got {shape}")
            proposals[image_id] = value.to(torch.float32)
        return proposals

    # ------------------------------------------------------------------ access
    @property
    def num_classes(self) -> int:
        """Number of foreground classes ``C`` (the detector needs ``C + 1`` with background)."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self._records)

    def image_path(self, index: int) -> str:
        return self._records[index].path

    def image_aspect_ratios(self) -> List[float]:
        """``width / height`` per sample, from the json sizes (no decoding). Images without a
        json size fall back to reading the file header; unreadable ones get 1.0."""
        ratios = []
        for rec in self._records:
            if rec.width is not None:
                ratios.append(rec.width / rec.height)
                continue
            try:
                width, height = read_image_size(rec.path)
                ratios.append(width / height)
            except BadImageError:
                ratios.append(1.0)
        return ratios

    def _load(self, rec: _ImageRecord):
        return load_image(rec.path, max_pixels=self.max_pixels)

    def _check_size(self, rec: _ImageRecord, width: int, height: int) -> Optional[str]:
        if rec.width is None or (rec.width, rec.height) == (width, height):
            return None
        return (f"json size {rec.width}x{rec.height} differs from the decoded (EXIF-oriented) "
                f"image size {width}x{height}; boxes are clipped to the decoded image")

    def __getitem__(self, index: int):
        sample = self.load(index)
        return None if isinstance(sample, SkippedImage) else sample

    def load(self, index: int):
        """``self[index]``, except that an unreadable image gives a :class:`SkippedImage` record
        (with ``skip_bad=True``; it raises :class:`BadImageError` otherwise) instead of ``None``."""
        rec = self._records[index]
        try:
            pil_image = self._load(rec)
        except BadImageError as exc:
            self.stats["bad_images"] += 1
            if not self.skip_bad:
                raise
            logger.warning("skipping image %s (image id %d): %s", exc.path, rec.image_id, exc.reason)
            return SkippedImage(rec.image_id, exc.path, exc.reason)
        width, height = pil_image.size
        mismatch = self._check_size(rec, width, height)
        if mismatch is not None:
            self.stats["size_mismatch"] += 1
            if rec.image_id not in self._warned_size:
                self._warned_size.add(rec.image_id)
                logger.warning("%s (image id %d): %s", rec.path, rec.image_id, mismatch)

        boxes = torch.from_numpy(rec.boxes.copy())
        boxes[:, 0::2].clamp_(0, width)
        boxes[:, 1::2].clamp_(0, height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        iscrowd = torch.from_numpy(rec.iscrowd.copy())
        if self.train:
            keep &= iscrowd == 0
        target: Dict[str, Any] = {
            "boxes": boxes[keep],
            "labels": torch.from_numpy(rec.labels.copy())[keep],
            "image_id": rec.image_id,
            "area": torch.from_numpy(rec.areas.copy())[keep],
            "iscrowd": iscrowd[keep],
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
        }
        if self._proposals is not None:
            props = self._proposals.get(rec.image_id, torch.zeros((0, 4)))
            boxes_p = props[:, :4].clone()
            boxes_p[:, 0::2].clamp_(0, width)
            boxes_p[:, 1::2].clamp_(0, height)
            target["proposals"] = boxes_p
            if props.shape[1] == 5:
                target["proposal_scores"] = props[:, 4].clone()

        image = image_to_tensor(pil_image)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(ann_file={self.ann_file!r}, images={len(self)}, "
                f"classes={self.num_classes}, train={self.train})")


class WithSkipped(Dataset):
    """``dataset`` with unreadable images as :class:`SkippedImage` records instead of ``None``
    (:meth:`CocoDetection.load`), so that evaluation can name them; collate its samples with
    :func:`collate_with_skipped`."""

    def __init__(self, dataset: CocoDetection) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset.load(index)


def _is_sample(sample: Any) -> bool:
    return sample is not None and not isinstance(sample, SkippedImage)


def collate_fn(batch: Sequence[Any]):
    """DataLoader collate for detection: drop skipped samples (``None`` or
    :class:`SkippedImage`) and return ``(tuple(images), tuple(targets))``; images keep their own
    sizes (the model batches them). A batch without any readable sample gives ``((), ())``."""
    samples = [s for s in batch if _is_sample(s)]
    if not samples:
        return (), ()
    images, targets = zip(*samples)
    return tuple(images), tuple(targets)


def collate_with_skipped(batch: Sequence[Any]):
    """:func:`collate_fn` plus the batch's :class:`SkippedImage` records:
    ``(tuple(images), tuple(targets), tuple(skipped))``."""
    images, targets = collate_fn(batch)
    return images, targets, tuple(s for s in batch if isinstance(s, SkippedImage))


def check_dataset(dataset: CocoDetection) -> Dict[str, Any]:
    """Decode every image of ``dataset`` and report everything that is wrong.

    Returns a dict with ``ann_file``, ``image_root``, ``images`` (count), ``readable_images``,
    ``bad_images``, ``size_mismatches``, ``boxes``, ``classes`` (names), ``stats`` (the
    dataset's load-time counters), ``problems`` (list of ``(file, reason)``: annotation problems
    found while loading, then per-image problems) and ``ok`` (``True`` when there are none).
    Transforms are not applied and the dataset's runtime counters are not changed.
    """
    if not isinstance(dataset, CocoDetection):
        raise ValueError(f"dataset must be a CocoDetection, got {type(dataset).__name__}")
    problems: List[Tuple[str, str]] = list(dataset.problems)
    readable = bad = mismatches = 0
    for rec in dataset._records:
        try:
            image = dataset._load(rec)
        except BadImageError as exc:
            bad += 1
            problems.append((exc.path, exc.reason))
            continue
        readable += 1
        mismatch = dataset._check_size(rec, *image.size)
        if mismatch is not None:
            mismatches += 1
            problems.append((rec.path, mismatch))
    return {
        "ann_file": dataset.ann_file,
        "image_root": dataset.image_root,
        "images": len(dataset),
        "readable_images": readable,
        "bad_images": bad,
        "size_mismatches": mismatches,
        "boxes": dataset.stats["boxes"],
        "classes": list(dataset.class_names),
        "stats": dict(dataset.stats),
        "problems": problems,
        "ok": not problems,
    }
