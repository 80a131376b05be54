"""How much of the pyramid's signal reaches RetinaNet's classifier at initialisation.

Question: why does ``retinanet_lite0_fpn_cpu`` without group norm in its head barely learn to
classify in a CPU schedule of a few hundred iterations?

RetinaNet's classification tower is four 3x3 convolutions with ReLU, initialised with weights of
standard deviation 0.01 (torchvision's and mmdetection's init). On 128 channels each such layer
scales its input's spread by about ``sqrt(9 * 128) * 0.01 / sqrt(2) = 0.24``, so after four the
features that feed the classifier are a few thousandths of the pyramid's, and so is the
gradient of the classifier's weights. Group norm after each convolution (torchvision's
``retinanet_resnet50_fpn_v2`` head; ``model.retina_head_norm: gn``) restores the spread at every
layer.

For each head norm the script builds the config (ImageNet weights, the same seed), runs the
first ``--images`` test photos of a VOC folder through its transform, backbone and pyramid, and
records the standard deviation of every pyramid level and of the classification tower's output
after each of its layers, pooled over the photos and levels, and of the logits.

Run: ``python -m benchmarks.retina_head_signal [--data-root D] [--images N] [--threads T]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a file: python benchmarks/retina_head_signal.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torchvision.transforms.functional import to_tensor

from benchmarks import _common as common
from libra_rcnn.config import load_config
from libra_rcnn.data.image_io import load_image
from libra_rcnn.models import build_model

NAME = "retina_head_signal"
HEAD_NORMS = ("none", "gn")


def test_photos(data_root: Path, count: int) -> List[Path]:
    """The first ``count`` photos of the folder's ``test`` image set, in file order."""
    stems = (data_root / "ImageSets" / "Main" / "test.txt").read_text(encoding="utf-8").split()
    return [data_root / "JPEGImages" / f"{stem}.jpg" for stem in sorted(stems)[:count]]


@torch.no_grad()
def tower_spread(model: torch.nn.Module, images: Sequence[torch.Tensor]) -> Dict[str, Any]:
    """Standard deviation of the pyramid levels, of the classification tower after each layer
    and of the logits, each pooled over ``images`` and the pyramid levels."""
    batch, _ = model.transform(list(images))
    levels = list(model.backbone(batch.tensors).values())
    head = model.head.classification_head
    stages: Dict[str, List[torch.Tensor]] = {"pyramid": levels}
    features = levels
    for index, layer in enumerate(head.conv):
        features = [layer(level) for level in features]
        stages[f"tower layer {index + 1}"] = features
    stages["logits"] = [head.cls_logits(level) for level in features]
    return {name: torch.cat([t.flatten() for t in tensors]).std().item()
            for name, tensors in stages.items()}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser, name=NAME)
    parser.add_argument("--data-root", type=Path,
                        default=common.REPO_ROOT / ".." / "shared" / "data" / "bccd",
                        help="a VOC folder with a test image set (default: ../shared/data/bccd)")
    parser.add_argument("--images", type=int, default=8, help="test photos (default 8)")
    parser.add_argument("--config", default="retinanet_lite0_fpn_cpu")
    parser.add_argument("--num-classes", type=int, default=4,
                        help="classes + background (default 4, BCCD's)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    device = common.resolve_device(args)
    count = 1 if args.smoke else args.images
    images = [to_tensor(load_image(path)).to(device) for path in test_photos(args.data_root, count)]
    overrides = [f"model.num_classes={args.num_classes}"]
    if args.smoke:
        overrides += ["model.min_size=64", "model.max_size=96"]
    rows = []
    for norm in HEAD_NORMS:
        cfg = load_config(args.config, [*overrides, f"model.retina_head_norm={norm}"])
        torch.manual_seed(args.seed)
        model = build_model(cfg.model).to(device).eval()
        rows.append({"retina_head_norm": norm, "std": tower_spread(model, images)})
    stages = list(rows[0]["std"])
    print(common.format_table(
        [{"stage": stage, **{norm["retina_head_norm"]: norm["std"][stage] for norm in rows}}
         for stage in stages],
        [("stage", "std of", ""), *((norm, f"head norm {norm}", ".4f") for norm in HEAD_NORMS)]))
    payload = {"benchmark": NAME, "environment": common.environment_info(device, args),
               "settings": {"config": args.config, "data_root": str(args.data_root),
                            "images": [p.name for p in test_photos(args.data_root, count)],
                            "overrides": overrides},
               "rows": rows}
    return common.write_results(NAME, device, args, payload)


if __name__ == "__main__":
    main()
