"""Balanced feature pyramid against the FPN alone, forward + backward.

Question: what does the balanced feature pyramid (Sec. 3.2: rescale, integrate, refine with a
non-local block, strengthen) add to the neck's training cost and memory, and how does that grow
with the image size? The refine variants of Table 5 and PAFPN are included.

Inputs: ResNet-50's C2-C5 for a batch of ``B`` images of ``H x W`` (padded to a multiple of 32,
as torchvision's transform does): ``[B, 256|512|1024|2048, H/4..H/32, W/4..W/32]``, requiring
grad (a trainable backbone receives their gradient). The neck is torchvision's
``FeaturePyramidNetwork`` (or :class:`libra_rcnn.ops.PAFPN`), then optionally
:class:`libra_rcnn.ops.BalancedFeaturePyramid` over its five levels, as
``libra_rcnn.models.backbone`` composes them for either detector layout:

* ``--layout two_stage`` (default; Faster R-CNN, RPN): C2-C5, ``LastLevelMaxPool`` (P2-P6),
  ``refine_level=2``;
* ``--layout retinanet``: C3-C5, P6/P7 from C5 (P3-P7), ``refine_level=1``.

One call = forward, sum of the levels' means, backward.

Cases, alternated in one process per size: ``fpn``, ``fpn+bfp(none)``, ``fpn+bfp(conv)``,
``fpn+bfp(non_local)`` (the paper's), ``pafpn``, ``pafpn+bfp(non_local)``. Peak memory of one
call is measured per case after the timing (see ``benchmarks/_common.py``).

Run: ``python -m benchmarks.pyramid [--layout retinanet] [--device cuda] [--amp] [--smoke]
[--profile]``.
"""

from __future__ import annotations

import argparse
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

if __package__ in (None, ""):  # run as a file: python benchmarks/pyramid.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from benchmarks import _common as common
from libra_rcnn.models import LastLevelP6P7FromC5
from libra_rcnn.ops import PAFPN, BalancedFeaturePyramid

NAME = "pyramid"
STAGE_CHANNELS = (256, 512, 1024, 2048)
STRIDES = (4, 8, 16, 32)
#: layout -> (ResNet stages used, 0 = C2; refine level) as libra_rcnn.models.backbone builds them
LAYOUTS = {"two_stage": ((0, 1, 2, 3), 2), "retinanet": ((1, 2, 3), 1)}
CASES: Tuple[Tuple[str, str, Optional[str]], ...] = (
    ("fpn", "fpn", None),
    ("fpn+bfp(none)", "fpn", "none"),
    ("fpn+bfp(conv)", "fpn", "conv"),
    ("fpn+bfp(non_local)", "fpn", "non_local"),
    ("pafpn", "pafpn", None),
    ("pafpn+bfp(non_local)", "pafpn", "non_local"),
)


class Neck(nn.Module):
    """FPN or PAFPN in one of the detectors' layouts, then an optional balanced feature pyramid.

    ``in_channels``: channels of the stages the layout uses (C2-C5 or C3-C5).
    """

    def __init__(self, neck: str, refine_type: Optional[str], in_channels: List[int],
                 out_channels: int, layout: str = "two_stage") -> None:
        super().__init__()
        fpn_class = PAFPN if neck == "pafpn" else FeaturePyramidNetwork
        if layout == "two_stage":
            extra: nn.Module = LastLevelMaxPool()
            num_levels = len(in_channels) + 1
        else:
            extra = LastLevelP6P7FromC5(in_channels[-1], out_channels)
            num_levels = len(in_channels) + 2
        self.fpn = fpn_class(in_channels, out_channels, extra_blocks=extra)
        self.bfp = None
        if refine_type is not None:
            self.bfp = BalancedFeaturePyramid(out_channels, num_levels,
                                              refine_level=LAYOUTS[layout][1],
                                              refine_type=refine_type)

    def forward(self, features: "OrderedDict[str, torch.Tensor]"):
        out = self.fpn(features)
        return self.bfp(out) if self.bfp is not None else out


def backbone_features(batch: int, height: int, width: int, device: torch.device,
                      dtype: torch.dtype, generator: torch.Generator, channel_scale: int = 1,
                      layout: str = "two_stage"):
    """ResNet-50's stages of ``layout`` (C2-C5 or C3-C5) for a padded ``height x width`` batch,
    requiring grad; keys ``"0", "1", ...`` as torchvision's ``IntermediateLayerGetter``."""
    pad_h, pad_w = -(-height // 32) * 32, -(-width // 32) * 32
    features = OrderedDict()
    for key, stage in enumerate(LAYOUTS[layout][0]):
        channels, stride = STAGE_CHANNELS[stage], STRIDES[stage]
        shape = (batch, channels // channel_scale, pad_h // stride, pad_w // stride)
        features[str(key)] = torch.randn(shape, generator=generator).to(
            device=device, dtype=dtype).requires_grad_(True)
    return features


def make_call(module: nn.Module, features, device: torch.device, amp: bool
              ) -> Callable[[], Any]:
    def call():
        with common.autocast(device, amp):
            outputs = module(features)
            loss = sum(level.float().mean() for level in outputs.values())
        loss.backward()
        # gradients are dropped at the end, not the start, so every call (and the memory
        # probe's window) allocates and frees its own
        for tensor in features.values():
            tensor.grad = None
        module.zero_grad(set_to_none=True)
        return loss
    return call


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_arguments(parser, name=NAME)
    parser.add_argument("--batch", type=int, default=None,
                        help="images per batch (default 1 on CPU, 2 on CUDA)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, metavar="H W",
                        help="image sizes as H W pairs (default 512 512 800 1333)")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="two_stage",
                        help="the detector whose neck is measured: two_stage (C2-C5, P2-P6, "
                             "refine level 2; default) or retinanet (C3-C5, P3-P7, level 1)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak memory pass")
    parser.add_argument("--profile", action="store_true",
                        help="also print torch.profiler's top ops of fpn+bfp(non_local), last size")
    args = parser.parse_args(argv)
    device = common.resolve_device(args)
    on_cuda = device.type == "cuda"
    rounds = args.rounds or (1 if args.smoke else (20 if on_cuda else 5))
    warmup = args.warmup if args.warmup is not None else 1
    batch = args.batch or (1 if args.smoke or not on_cuda else 2)
    flat_sizes = args.sizes or ([64, 96] if args.smoke else [512, 512, 800, 1333])
    if len(flat_sizes) % 2 or min(flat_sizes) < 32 or batch < 1:
        raise ValueError("--sizes must be H W pairs of at least 32 and --batch >= 1")
    sizes: List[Tuple[int, int]] = list(zip(flat_sizes[::2], flat_sizes[1::2]))
    # the smoke run shrinks the channels 8x so it takes seconds; the real run never does
    channel_scale = 8 if args.smoke else 1
    out_channels = 256 // channel_scale
    dtype = torch.float32  # autocast casts inside; inputs stay float32 as a backbone's would
    generator = torch.Generator().manual_seed(args.seed)

    torch.manual_seed(args.seed)  # module initialisation; the weights do not change the cost
    modules = {}
    for name, neck, refine in CASES:
        in_channels = [STAGE_CHANNELS[stage] // channel_scale for stage in LAYOUTS[args.layout][0]]
        module = Neck(neck, refine, in_channels, out_channels, args.layout)
        modules[name] = module.to(device).train()

    rows = []
    for height, width in sizes:
        features = backbone_features(batch, height, width, device, dtype, generator,
                                     channel_scale, args.layout)
        calls = {name: make_call(modules[name], features, device, args.amp) for name, _, _ in CASES}
        times = common.alternating_timings(calls, rounds=rounds, warmup=warmup, device=device)
        for name, _, _ in CASES:
            stats = common.summarize([t * 1e3 for t in times[name]])
            row = {
                "height": height, "width": width, "batch": batch, "case": name,
                "median_ms": stats["median"], "p25_ms": stats["p25"], "p75_ms": stats["p75"],
                "rounds": stats["n"],
                "ratio_vs_fpn": common.paired_ratio(times[name], times["fpn"]),
                "params_m": sum(p.numel() for p in modules[name].parameters()) / 1e6,
                "peak_mib": None,
            }
            row["overhead_ms_vs_fpn"] = row["median_ms"] - common.summarize(
                [t * 1e3 for t in times["fpn"]])["median"]
            rows.append(row)
        if not args.no_memory:
            for row in rows[-len(CASES):]:
                call = calls[row["case"]]
                row["peak_mib"] = common.peak_memory_bytes(call, device) / 2**20

    columns = [("height", "H", "d"), ("width", "W", "d"), ("batch", "B", "d"), ("case", "case", ""),
               ("median_ms", "median ms", ".1f"), ("p25_ms", "p25", ".1f"), ("p75_ms", "p75", ".1f"),
               ("ratio_vs_fpn", "x fpn", ".3f"), ("overhead_ms_vs_fpn", "+ms vs fpn", ".1f"),
               ("peak_mib", "peak MiB", ".0f"), ("params_m", "params M", ".2f")]
    print(common.format_table(rows, columns))

    if args.profile:
        height, width = sizes[-1]
        features = backbone_features(batch, height, width, device, dtype, generator, channel_scale,
                                     args.layout)
        call = make_call(modules["fpn+bfp(non_local)"], features, device, args.amp)
        print(common.profile_summary(call, device, calls=2))

    payload = {
        "benchmark": NAME,
        "environment": common.environment_info(device, args),
        "settings": {"rounds": rounds, "warmup": warmup, "batch": batch, "sizes": sizes,
                     "out_channels": out_channels, "channel_scale": channel_scale,
                     "layout": args.layout, "refine_level": LAYOUTS[args.layout][1],
                     "levels": "P2-P6" if args.layout == "two_stage" else "P3-P7"},
        "rows": rows,
    }
    return common.write_results(NAME, device, args, payload)


if __name__ == "__main__":
    main()
