"""Detectors: torchvision's Faster R-CNN / RetinaNet / RPN / Fast R-CNN and Cascade R-CNN with
the Libra parts.

Start with :func:`build_model` and a :class:`ModelConfig` from :func:`libra_model_config` or
:func:`baseline_model_config`, or with one of the torchvision-style builders
(``libra_faster_rcnn_resnet50_fpn(num_classes=81, weights_backbone="IMAGENET1K_V1")``).
"""

from .anchors import FixedStrideAnchorGenerator
from .backbone import (
    FrozenStatsBatchNorm2d,
    LastLevelP6P7FromC5,
    LibraBackboneWithFPN,
    build_resnet,
    freeze_backbone_layers,
    load_backbone_weights,
    norm_layer_factory,
    fpn_backbone,
    resolve_backbone_weights,
)
from .box_coder import BoxParts, MMDetBoxCoder, keep_all_boxes, keep_boxes_at_least, keep_nonempty_boxes, mmdet_batched_nms
from .box_losses import box_regression_loss_sum, check_box_loss_config, check_box_loss_values
from .builders import (
    ARCHS,
    apply_overrides,
    baseline_model_config,
    build_model,
    cascade_rcnn_resnet50_fpn,
    check_cascade_config,
    check_model_config,
    check_model_values,
    fast_rcnn_resnet50_fpn,
    faster_rcnn_resnet50_fpn,
    faster_rcnn_resnet101_fpn,
    faster_rcnn_resnext101_64x4d_fpn,
    libra_cascade_rcnn_resnet50_fpn,
    libra_fast_rcnn_resnet50_fpn,
    libra_faster_rcnn_resnet50_fpn,
    libra_faster_rcnn_resnet101_fpn,
    libra_faster_rcnn_resnext101_64x4d_fpn,
    libra_model_config,
    libra_retinanet_resnet50_fpn,
    libra_rpn_resnet50_fpn,
    retinanet_resnet50_fpn,
    rpn_resnet50_fpn,
    rpn_resnet101_fpn,
    rpn_resnext101_64x4d_fpn,
    used_settings,
)
from .cascade import CascadeRoIHeads, LibraCascadeRCNN, refine_boxes
from .config import BalancedFeaturePyramidConfig, BoxLossConfig, CascadeConfig, ModelConfig, SamplerConfig
from .conventions import MMDetConvention, TorchvisionConvention, convention_parts
from .faster_rcnn import ClassAgnosticPredictor, LibraFastRCNN, LibraFasterRCNN
from .head_settings import AnchorSampling, DetectionSettings, ProposalSettings
from .proposals import dump_proposals, load_proposals, select_proposals
from .matcher import MaxIoUMatcher
from .retinanet import LibraRetinaNet, LibraRetinaNetHead, LibraRetinaNetRegressionHead, MMDetRetinaNetHead
from .roi_align import MMDetMultiScaleRoIAlign
from .roi_heads import (LibraRoIHeads, check_sampler_config, fastrcnn_loss, match_proposals,
                        sampling_settings)
from .rpn import LibraRegionProposalNetwork, LibraRPN
from .transform import MMDetTransform
from .validation import validate_images, validate_inputs, validate_proposals, validate_targets

__all__ = [
    "ARCHS",
    "AnchorSampling",
    "BoxParts",
    "DetectionSettings",
    "ProposalSettings",
    "FixedStrideAnchorGenerator",
    "FrozenStatsBatchNorm2d",
    "MMDetBoxCoder",
    "MMDetConvention",
    "MMDetMultiScaleRoIAlign",
    "MMDetRetinaNetHead",
    "MMDetTransform",
    "MaxIoUMatcher",
    "TorchvisionConvention",
    "convention_parts",
    "keep_all_boxes",
    "keep_boxes_at_least",
    "keep_nonempty_boxes",
    "mmdet_batched_nms",
    "BalancedFeaturePyramidConfig",
    "BoxLossConfig",
    "CascadeConfig",
    "CascadeRoIHeads",
    "ClassAgnosticPredictor",
    "LastLevelP6P7FromC5",
    "LibraBackboneWithFPN",
    "LibraCascadeRCNN",
    "LibraFastRCNN",
    "LibraFasterRCNN",
    "LibraRPN",
    "LibraRegionProposalNetwork",
    "LibraRetinaNet",
    "LibraRetinaNetHead",
    "LibraRetinaNetRegressionHead",
    "LibraRoIHeads",
    "ModelConfig",
    "SamplerConfig",
    "apply_overrides",
    "baseline_model_config",
    "box_regression_loss_sum",
    "build_model",
    "build_resnet",
    "cascade_rcnn_resnet50_fpn",
    "check_box_loss_config",
    "check_box_loss_values",
    "check_cascade_config",
    "check_model_config",
    "check_model_values",
    "check_sampler_config",
    "dump_proposals",
    "fast_rcnn_resnet50_fpn",
    "fastrcnn_loss",
    "faster_rcnn_resnet50_fpn",
    "faster_rcnn_resnet101_fpn",
    "faster_rcnn_resnext101_64x4d_fpn",
    "freeze_backbone_layers",
    "libra_cascade_rcnn_resnet50_fpn",
    "libra_fast_rcnn_resnet50_fpn",
    "libra_faster_rcnn_resnet50_fpn",
    "libra_faster_rcnn_resnet101_fpn",
    "libra_faster_rcnn_resnext101_64x4d_fpn",
    "libra_model_config",
    "libra_retinanet_resnet50_fpn",
    "libra_rpn_resnet50_fpn",
    "load_backbone_weights",
    "load_proposals",
    "match_proposals",
    "norm_layer_factory",
    "fpn_backbone",
    "refine_boxes",
    "resolve_backbone_weights",
    "retinanet_resnet50_fpn",
    "rpn_resnet50_fpn",
    "rpn_resnet101_fpn",
    "rpn_resnext101_64x4d_fpn",
    "sampling_settings",
    "select_proposals",
    "used_settings",
    "validate_images",
    "validate_inputs",
    "validate_proposals",
    "validate_targets",
]
