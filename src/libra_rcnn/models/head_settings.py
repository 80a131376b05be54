"""The settings a detector head takes as one object each, with their defaults.

* :class:`ProposalSettings` -- how the RPN selects its proposals;
* :class:`AnchorSampling` -- which anchors the RPN matches and samples in training;
* :class:`DetectionSettings` -- how the RoI heads and RetinaNet select their detections.

The defaults are ``ModelConfig``'s, which are torchvision's Faster R-CNN's. Each object is
checked once, when made: a one-line ``ValueError`` names the ``ModelConfig`` field the value
stands for.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..checks import check_minus_one_or_non_negative, check_positive_int, check_unit_interval

__all__ = ["AnchorSampling", "DetectionSettings", "ProposalSettings"]


@dataclass(frozen=True)
class ProposalSettings:
    """The RPN's proposal selection: per image, the best ``pre_nms_top_n_*`` anchors of each
    level, decoded, clipped, the small ones dropped, those scoring ``>= score_thresh`` kept, NMS
    within each level at ``nms_thresh``, the best ``post_nms_top_n_*`` kept (``*_train`` in
    training, ``*_test`` at inference)."""

    pre_nms_top_n_train: int = 2000
    pre_nms_top_n_test: int = 1000
    post_nms_top_n_train: int = 2000
    post_nms_top_n_test: int = 1000
    nms_thresh: float = 0.7
    score_thresh: float = 0.0

    def __post_init__(self) -> None:
        for name in ("pre_nms_top_n_train", "pre_nms_top_n_test", "post_nms_top_n_train",
                     "post_nms_top_n_test"):
            check_positive_int(getattr(self, name), f"rpn_{name}")
        check_unit_interval(self.nms_thresh, "rpn_nms_thresh")
        check_unit_interval(self.score_thresh, "rpn_score_thresh")

    @property
    def pre_nms_top_n(self) -> dict[str, int]:
        """torchvision's form: ``{"training": int, "testing": int}``."""
        return {"training": self.pre_nms_top_n_train, "testing": self.pre_nms_top_n_test}

    @property
    def post_nms_top_n(self) -> dict[str, int]:
        """torchvision's form: ``{"training": int, "testing": int}``."""
        return {"training": self.post_nms_top_n_train, "testing": self.post_nms_top_n_test}


@dataclass(frozen=True)
class AnchorSampling:
    """The RPN's training anchors.

    Attributes:
        batch_size_per_image: anchors sampled per image.
        positive_fraction: share of them demanded as positives, in ``[0, 1]``.
        neg_pos_ub: when ``>= 0``, at most ``int(neg_pos_ub * max(num_pos, 1))`` negatives per
            image (mmdetection's; 5 in its Libra Faster R-CNN); ``-1``: no cap (torchvision's).
        allowed_border: when ``>= 0``, only the anchors with ``x1, y1 >= -allowed_border`` and
            ``x2 < width + allowed_border``, ``y2 < height + allowed_border`` (the resized
            image's size) are matched and sampled, the others ignored; ``-1``: every anchor
            (torchvision's).
    """

    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    neg_pos_ub: float = -1.0
    allowed_border: float = -1.0

    def __post_init__(self) -> None:
        check_positive_int(self.batch_size_per_image, "rpn_batch_size_per_image")
        check_unit_interval(self.positive_fraction, "rpn_positive_fraction")
        check_minus_one_or_non_negative(self.neg_pos_ub, "rpn_neg_pos_ub", "no cap")
        check_minus_one_or_non_negative(self.allowed_border, "rpn_allowed_border", "every anchor")


@dataclass(frozen=True)
class DetectionSettings:
    """A detector's final selection: per image, the (box, class) pairs scoring above
    ``score_thresh``, class-wise NMS at ``nms_thresh``, the best ``detections_per_img`` kept."""

    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100

    def __post_init__(self) -> None:
        check_unit_interval(self.score_thresh, "box_score_thresh")
        check_unit_interval(self.nms_thresh, "box_nms_thresh")
        check_positive_int(self.detections_per_img, "box_detections_per_img")
