"""The paper's three components, each in its own module, usable without the rest of the package.

* :mod:`.iou_balanced_sampler` -- IoU-balanced sampling (Sec. 3.1)
* :mod:`.balanced_feature_pyramid` (+ :mod:`.non_local`, :mod:`.pafpn`) -- balanced feature pyramid (Sec. 3.2)
* :mod:`.balanced_l1_loss` -- balanced L1 loss (Sec. 3.3)
"""

from .balanced_feature_pyramid import BalancedFeaturePyramid
from .balanced_l1_loss import BalancedL1Loss, balanced_l1_loss
from .iou_balanced_sampler import (
    SamplingSettings,
    instance_balanced_positive_sample,
    iou_balanced_negative_sample,
    random_choice,
    sample_positives_negatives,
)
from .non_local import NonLocal2d
from .pafpn import PAFPN

__all__ = [
    "BalancedFeaturePyramid",
    "BalancedL1Loss",
    "NonLocal2d",
    "PAFPN",
    "SamplingSettings",
    "balanced_l1_loss",
    "instance_balanced_positive_sample",
    "iou_balanced_negative_sample",
    "random_choice",
    "sample_positives_negatives",
]
