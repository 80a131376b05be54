"""Tests for PAFPN (FPN + PANet bottom-up path) and its composition with the balanced pyramid."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from libra_rcnn.ops.balanced_feature_pyramid import BalancedFeaturePyramid
from libra_rcnn.ops.pafpn import PAFPN

IN_CHANNELS = [4, 8, 16, 32]
OUT_CHANNELS = 8
DIVISIBLE_SIZES = [(32, 24), (16, 12), (8, 6), (4, 3)]
ODD_SIZES = [(25, 38), (13, 19), (7, 10), (4, 5)]  # ceil-halving, as ResNet strides produce
# Floor-halving: a 3x3 stride-2 conv gives 13x19 from 25x37 but P is 12x18, so N must be resized.
MISMATCHED_SIZES = [(25, 37), (12, 18), (6, 9), (3, 4)]


def _inputs(sizes, *, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return OrderedDict(
        (str(i), torch.randn(batch, c, h, w, generator=generator))
        for i, (c, (h, w)) in enumerate(zip(IN_CHANNELS, sizes))
    )


def _fpn_and_pafpn(extra_blocks_factory=None, seed=0):
    def extra():
        return extra_blocks_factory() if extra_blocks_factory is not None else None

    # Module init draws from the global generator: seed it inside a forked RNG state only.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        fpn = FeaturePyramidNetwork(IN_CHANNELS, OUT_CHANNELS, extra_blocks=extra())
        pafpn = PAFPN(IN_CHANNELS, OUT_CHANNELS, extra_blocks=extra())
    result = pafpn.load_state_dict(fpn.state_dict(), strict=False)
    return fpn, pafpn, result


def _reference_bottom_up(pafpn, pyramid):
    """N_0 = P_0; N_{i+1} = fuse_i(P_{i+1} + resize(down_i(N_i))), written per level."""
    outputs = [pyramid[0]]
    for i in range(len(pyramid) - 1):
        down = pafpn.downsample_blocks[i][0]
        fuse = pafpn.pafpn_blocks[i][0]
        reduced = F.conv2d(outputs[i], down.weight, down.bias, stride=2, padding=1)
        if reduced.shape[-2:] != pyramid[i + 1].shape[-2:]:
            reduced = F.interpolate(reduced, size=pyramid[i + 1].shape[-2:], mode="nearest")
        outputs.append(F.conv2d(pyramid[i + 1] + reduced, fuse.weight, fuse.bias, padding=1))
    return outputs


@pytest.mark.parametrize("sizes", [DIVISIBLE_SIZES, ODD_SIZES, MISMATCHED_SIZES])
def test_keys_and_shapes_equal_fpn(sizes):
    fpn, pafpn, _ = _fpn_and_pafpn(LastLevelMaxPool)
    x = _inputs(sizes)
    expected = fpn(x)
    actual = pafpn(x)
    assert isinstance(actual, OrderedDict)
    assert list(actual.keys()) == list(expected.keys()) == ["0", "1", "2", "3", "pool"]
    assert [v.shape for v in actual.values()] == [v.shape for v in expected.values()]


def test_fpn_state_dict_loads_with_only_bottom_up_missing():
    fpn, pafpn, result = _fpn_and_pafpn(LastLevelMaxPool)
    assert result.unexpected_keys == []
    assert result.missing_keys, "the bottom-up parameters must be reported missing"
    assert all(k.startswith(("downsample_blocks.", "pafpn_blocks.")) for k in result.missing_keys)
    assert len(result.missing_keys) == 2 * 2 * (len(IN_CHANNELS) - 1)  # weight + bias per conv
    fpn_keys = set(fpn.state_dict())
    assert fpn_keys <= set(pafpn.state_dict())


@pytest.mark.parametrize("sizes", [DIVISIBLE_SIZES, ODD_SIZES, MISMATCHED_SIZES])
def test_outputs_match_fpn_plus_reference_bottom_up(sizes):
    fpn, pafpn, _ = _fpn_and_pafpn(LastLevelMaxPool)
    x = _inputs(sizes, seed=1)
    with torch.no_grad():
        pyramid = list(fpn(x).values())[:4]  # torchvision's own top-down result
        expected = _reference_bottom_up(pafpn, pyramid)
        expected.append(F.max_pool2d(expected[-1], kernel_size=1, stride=2))
        actual = list(pafpn(x).values())
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    # The finest level is untouched by the bottom-up path, every coarser one changes.
    torch.testing.assert_close(actual[0], pyramid[0])
    for a, p in zip(actual[1:4], pyramid[1:4]):
        assert (a - p).abs().max() > 1e-3


def test_p6p7_extra_block_uses_final_bottom_up_output():
    pafpn = PAFPN(IN_CHANNELS, OUT_CHANNELS, extra_blocks=LastLevelP6P7(OUT_CHANNELS, OUT_CHANNELS))
    x = _inputs(ODD_SIZES, batch=1)
    with torch.no_grad():
        out = pafpn(x)
        assert list(out.keys()) == ["0", "1", "2", "3", "p6", "p7"]
        torch.testing.assert_close(out["p6"], pafpn.extra_blocks.p6(out["3"]))
        torch.testing.assert_close(out["p7"], pafpn.extra_blocks.p7(F.relu(out["p6"])))


def test_gradients_reach_bottom_up_parameters():
    pafpn = PAFPN(IN_CHANNELS, OUT_CHANNELS, extra_blocks=LastLevelMaxPool())
    out = pafpn(_inputs(ODD_SIZES))
    generator = torch.Generator().manual_seed(4)
    loss = sum((v * torch.randn(v.shape, generator=generator)).sum() for v in out.values())
    loss.backward()
    for name, param in pafpn.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_norm_layer_applies_to_bottom_up_blocks():
    pafpn = PAFPN(IN_CHANNELS, OUT_CHANNELS, norm_layer=nn.BatchNorm2d)
    for block in list(pafpn.downsample_blocks) + list(pafpn.pafpn_blocks):
        assert isinstance(block[1], nn.BatchNorm2d) and block[0].bias is None
    assert pafpn.downsample_blocks[0][0].stride == (2, 2)
    out = pafpn(_inputs(ODD_SIZES))
    assert [v.shape[-2:] for v in out.values()] == [torch.Size(s) for s in ODD_SIZES]


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="out_channels"):
        PAFPN(IN_CHANNELS, 0)
    with pytest.raises(ValueError, match="in_channels_list"):
        PAFPN([], 8)
    pafpn = PAFPN(IN_CHANNELS, OUT_CHANNELS)
    x = _inputs(ODD_SIZES)
    del x["3"]
    with pytest.raises(ValueError, match="4 levels"):
        pafpn(x)


def test_balanced_pafpn_composes():
    """Table 5's "Balanced PAFPN": FPN -> PAFPN -> balanced feature pyramid."""
    pafpn = PAFPN(IN_CHANNELS, OUT_CHANNELS, extra_blocks=LastLevelMaxPool())
    bfp = BalancedFeaturePyramid(OUT_CHANNELS, 5, refine_level=2, refine_type="non_local")
    with torch.no_grad():
        bfp.refine.conv_out.weight.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(0))
    x = _inputs(ODD_SIZES, batch=1)
    pyramid = pafpn(x)
    balanced = bfp(pyramid)
    assert isinstance(balanced, OrderedDict)
    assert list(balanced.keys()) == list(pyramid.keys())
    assert [v.shape for v in balanced.values()] == [v.shape for v in pyramid.values()]
    sum(v.sum() for v in balanced.values()).backward()
    for param in pafpn.pafpn_blocks.parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0
