"""Libra R-CNN: balanced learning for object detection, in pure PyTorch + torchvision.

Paper components (``libra_rcnn.ops``):

* :func:`balanced_l1_loss` / :class:`BalancedL1Loss` -- objective-level balance (Eq. 7-9)
* :mod:`libra_rcnn.ops.iou_balanced_sampler` -- sample-level balance (Sec. 3.1)
* :class:`BalancedFeaturePyramid` -- feature-level balance (Sec. 3.2)
"""

__version__ = "0.1.0"
