"""Tests for the balanced feature pyramid (Sec. 3.2, Eq. 3) and the non-local refinement block."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from libra_rcnn.engine.train import _deterministic
from libra_rcnn.ops.balanced_feature_pyramid import BalancedFeaturePyramid
from libra_rcnn.ops.non_local import NonLocal2d

CHANNELS = 4
# Each level exactly half the previous one: integer-factor reference ops apply at any refine level.
DIVISIBLE_SIZES = [(64, 32), (32, 16), (16, 8), (8, 4), (4, 2), (2, 1)]
# ResNet-like sizes that do not halve exactly.
ODD_SIZES = [(25, 38), (13, 19), (7, 10), (4, 5), (2, 3), (1, 2)]
SMALL_ODD_SIZES = [(13, 19), (7, 10), (4, 5), (2, 3), (1, 2), (1, 1)]
LEVEL_REFINE_PAIRS = [(levels, refine) for levels in (4, 5, 6) for refine in range(levels)]


def _features(sizes, *, batch=2, channels=CHANNELS, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, h, w, generator=generator) for h, w in sizes]


# ---------------------------------------------------------------------------------------------
# Independent references, written with explicit per-level loops.
# ---------------------------------------------------------------------------------------------


def _repeat(x, factor):
    """Nearest upsampling by an integer factor: each element becomes a factor x factor block."""
    return x.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)


def _reference_divisible(features, refine_level, refine=lambda t: t):
    """Eq. 3 + residual scatter for sizes related by powers of two, using only
    fixed-kernel max pooling and element repetition (nearest upsampling by an integer factor)."""
    gathered = []
    for level, feature in enumerate(features):
        factor = 2 ** abs(level - refine_level)
        if level < refine_level:
            gathered.append(F.max_pool2d(feature, kernel_size=factor, stride=factor))
        else:
            gathered.append(_repeat(feature, factor))
    balanced = refine(sum(gathered) / len(gathered))
    outputs = []
    for level, feature in enumerate(features):
        factor = 2 ** abs(level - refine_level)
        if level < refine_level:
            residual = _repeat(balanced, factor)
        else:
            residual = F.max_pool2d(balanced, kernel_size=factor, stride=factor)
        outputs.append(feature + residual)
    return outputs


def _nearest_indices(in_size, out_size):
    # PyTorch's "nearest" mode: src = floor(dst * (in / out)) with a float32 scale.
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    indices = (torch.arange(out_size, dtype=torch.float32) * scale).floor().long()
    return indices.clamp(max=in_size - 1)


def _reference_nearest(x, size):
    rows = _nearest_indices(x.shape[2], size[0])
    cols = _nearest_indices(x.shape[3], size[1])
    return x[:, :, rows][:, :, :, cols]


def _reference_adaptive_max(x, size):
    """Adaptive max pooling by its bin definition: bin i covers [floor(i*H/h), ceil((i+1)*H/h))."""
    in_h, in_w = x.shape[2:]
    out = x.new_empty(x.shape[0], x.shape[1], *size)
    for i in range(size[0]):
        top, bottom = (i * in_h) // size[0], math.ceil((i + 1) * in_h / size[0])
        for j in range(size[1]):
            left, right = (j * in_w) // size[1], math.ceil((j + 1) * in_w / size[1])
            out[:, :, i, j] = x[:, :, top:bottom, left:right].amax(dim=(2, 3))
    return out


def _reference_general(features, refine_level, refine=lambda t: t):
    size = tuple(features[refine_level].shape[2:])
    gathered = []
    for level, feature in enumerate(features):
        if level < refine_level:
            gathered.append(_reference_adaptive_max(feature, size))
        else:
            gathered.append(_reference_nearest(feature, size))
    balanced = refine(sum(gathered) / len(gathered))
    outputs = []
    for level, feature in enumerate(features):
        target = tuple(feature.shape[2:])
        if level < refine_level:
            outputs.append(feature + _reference_nearest(balanced, target))
        else:
            outputs.append(feature + _reference_adaptive_max(balanced, target))
    return outputs


def _assert_all_close(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Reference sanity: the hand-written resizers agree with torch on the sizes used here.
# ---------------------------------------------------------------------------------------------


def test_reference_resizers_match_definitions_on_odd_sizes():
    x = _features([(25, 38)], batch=1, channels=2)[0]
    for size in [(13, 19), (7, 10), (4, 5), (2, 3)]:
        torch.testing.assert_close(_reference_adaptive_max(x, size), F.adaptive_max_pool2d(x, size))
        small = F.adaptive_max_pool2d(x, size)
        expected = F.interpolate(small, (25, 38))
        torch.testing.assert_close(_reference_nearest(small, (25, 38)), expected)


# ---------------------------------------------------------------------------------------------
# BalancedFeaturePyramid
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_levels,refine_level", LEVEL_REFINE_PAIRS)
def test_no_refine_matches_integer_factor_reference(num_levels, refine_level):
    features = _features(DIVISIBLE_SIZES[:num_levels])
    bfp = BalancedFeaturePyramid(CHANNELS, num_levels, refine_level=refine_level, refine_type=None)
    _assert_all_close(bfp(features), _reference_divisible(features, refine_level))


@pytest.mark.parametrize("num_levels,refine_level", LEVEL_REFINE_PAIRS)
def test_no_refine_matches_bin_reference_on_odd_sizes(num_levels, refine_level):
    features = _features(ODD_SIZES[:num_levels], seed=num_levels * 10 + refine_level)
    bfp = BalancedFeaturePyramid(
        CHANNELS, num_levels, refine_level=refine_level, refine_type="none"
    )
    outputs = bfp(tuple(features))
    assert isinstance(outputs, tuple)
    assert [o.shape for o in outputs] == [f.shape for f in features]
    _assert_all_close(outputs, _reference_general(features, refine_level))


@pytest.mark.parametrize("num_levels,refine_level", LEVEL_REFINE_PAIRS)
@pytest.mark.parametrize("refine_type", ["conv", "non_local"])
def test_refined_shapes_and_keys_preserved(num_levels, refine_level, refine_type):
    features = _features(SMALL_ODD_SIZES[:num_levels], batch=1)
    keys = ["p2", "p3", "p4", "p5", "p6", "p7"][:num_levels][::-1]  # order must be kept, not sorted
    inputs = OrderedDict(zip(keys, features))
    bfp = BalancedFeaturePyramid(
        CHANNELS, num_levels, refine_level=refine_level, refine_type=refine_type
    )
    outputs = bfp(inputs)
    assert isinstance(outputs, OrderedDict)
    assert list(outputs.keys()) == keys
    assert [o.shape for o in outputs.values()] == [f.shape for f in features]

    as_list = bfp(list(features))
    assert isinstance(as_list, list)
    _assert_all_close(as_list, list(outputs.values()))


def test_plain_dict_input_returns_plain_dict():
    features = _features(ODD_SIZES[:4])
    bfp = BalancedFeaturePyramid(CHANNELS, 4, refine_type=None)
    outputs = bfp(dict(zip("abcd", features)))
    assert type(outputs) is dict and list(outputs) == list("abcd")


def test_conv_refine_is_3x3_conv_plus_relu():
    features = _features(ODD_SIZES[:5])
    bfp = BalancedFeaturePyramid(CHANNELS, 5, refine_level=2, refine_type="conv")
    conv = bfp.refine[0]
    assert conv.kernel_size == (3, 3) and conv.padding == (1, 1)

    def refine(t):
        return F.conv2d(t, conv.weight, conv.bias, padding=1).clamp(min=0)

    with torch.no_grad():
        _assert_all_close(bfp(features), _reference_general(features, 2, refine))


def test_non_local_refine_wiring_matches_reference():
    features = _features(ODD_SIZES[:5])
    bfp = BalancedFeaturePyramid(CHANNELS, 5, refine_level=2, refine_type="non_local")
    assert isinstance(bfp.refine, NonLocal2d)
    # mmdetection's setting: reduction=1, no 1/sqrt(C') scaling.
    assert bfp.refine.inter_channels == CHANNELS and not bfp.refine.use_scale
    with torch.no_grad():
        bfp.refine.conv_out.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(3))
        _assert_all_close(bfp(features), _reference_general(features, 2, bfp.refine))


def test_non_local_starts_as_identity_refinement():
    features = _features(ODD_SIZES[:5])
    plain = BalancedFeaturePyramid(CHANNELS, 5, refine_level=2, refine_type=None)
    non_local = BalancedFeaturePyramid(CHANNELS, 5, refine_level=2, refine_type="non_local")
    for a, b in zip(non_local(features), plain(features)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        non_local.refine.conv_out.weight.normal_(0.0, 0.1, generator=generator)
    differences = [(a - b).abs().max().item() for a, b in zip(non_local(features), plain(features))]
    assert all(d > 1e-4 for d in differences)


@pytest.mark.parametrize("refine_type", [None, "conv", "non_local"])
def test_gradients_reach_every_level_and_parameter(refine_type):
    features = [f.requires_grad_() for f in _features(ODD_SIZES[:5])]
    weights = _features(ODD_SIZES[:5], seed=7)
    bfp = BalancedFeaturePyramid(CHANNELS, 5, refine_level=2, refine_type=refine_type)
    if refine_type == "non_local":
        # conv_out starts at zero, which blocks gradients to theta/phi/g by design.
        with torch.no_grad():
            bfp.refine.conv_out.weight.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(2))
    loss = sum((out * w).sum() for out, w in zip(bfp(features), weights))
    loss.backward()
    for feature, weight in zip(features, weights):
        # Beyond the identity residual (d loss / d C_l = w_l), gradient must flow via Eq. 3.
        assert (feature.grad - weight).abs().sum() > 0
    params = list(bfp.named_parameters())
    assert (len(params) == 0) == (refine_type is None)
    for name, param in params:
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(in_channels=0, num_levels=4), "in_channels"),
        (dict(in_channels=4, num_levels=1), "num_levels"),
        (dict(in_channels=4, num_levels=4, refine_level=4), "refine_level"),
        (dict(in_channels=4, num_levels=4, refine_level=-1), "refine_level"),
        (dict(in_channels=4, num_levels=4, refine_type="attention"), "refine_type"),
    ],
)
def test_invalid_construction_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BalancedFeaturePyramid(**kwargs)


def test_invalid_inputs_raise():
    bfp = BalancedFeaturePyramid(CHANNELS, 4, refine_type=None)
    features = _features(ODD_SIZES[:4])
    with pytest.raises(ValueError, match="4 levels"):
        bfp(features[:3])
    with pytest.raises(ValueError, match="level 1 must be a 4-D"):
        bfp([features[0], features[1][0], features[2], features[3]])
    with pytest.raises(ValueError, match="level 2 must have 4 channels"):
        bfp([features[0], features[1], features[2][:, :3], features[3]])
    with pytest.raises(ValueError, match="level 3 has batch size 1"):
        bfp([features[0], features[1], features[2], features[3][:1]])


# ---------------------------------------------------------------------------------------------
# NonLocal2d
# ---------------------------------------------------------------------------------------------


def _perturbed_non_local(channels=6, **kwargs):
    block = NonLocal2d(channels, **kwargs)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return block


def test_non_local_attention_rows_sum_to_one():
    block = _perturbed_non_local(6)
    x = _features([(5, 7)], batch=2, channels=6)[0]
    attention = block.attention_map(x)
    assert attention.shape == (2, 35, 35)
    assert (attention >= 0).all()
    torch.testing.assert_close(attention.sum(dim=-1), torch.ones(2, 35))
    assert attention.std() > 1e-3  # not trivially uniform


def test_non_local_matches_explicit_formula():
    for use_scale in (True, False):
        block = _perturbed_non_local(6, reduction=2, use_scale=use_scale)
        x = _features([(3, 4)], batch=2, channels=6)[0]

        def embed(conv):  # a 1x1 conv is a per-position matrix product
            weight, bias = conv.weight[:, :, 0, 0], conv.bias[None, :, None]
            return torch.einsum("oc,bcn->bon", weight, x.flatten(2)) + bias

        theta, phi, g = embed(block.theta), embed(block.phi), embed(block.g)  # [B, C', N]
        expected = torch.empty_like(x)
        scale = math.sqrt(3) if use_scale else 1.0
        n = x.shape[2] * x.shape[3]
        for b in range(2):
            for i in range(n):
                logits = torch.stack([theta[b, :, i] @ phi[b, :, j] for j in range(n)]) / scale
                y = (logits.softmax(0)[None, :] * g[b]).sum(dim=1)  # [C']
                out = block.conv_out.weight[:, :, 0, 0] @ y + block.conv_out.bias
                expected[b, :, i // 4, i % 4] = x[b, :, i // 4, i % 4] + out
        with torch.no_grad():
            torch.testing.assert_close(block(x), expected, rtol=1e-4, atol=1e-5)


def test_non_local_uniform_attention_averages_g():
    # Zero theta -> all logits equal -> y is the spatial mean of g at every position.
    block = _perturbed_non_local(4, reduction=1)
    with torch.no_grad():
        block.theta.weight.zero_()
        block.theta.bias.zero_()
    x = _features([(3, 5)], batch=1, channels=4)[0]
    with torch.no_grad():
        mean_g = block.g(x).mean(dim=(2, 3), keepdim=True).expand(-1, -1, 3, 5)
        torch.testing.assert_close(block(x), x + block.conv_out(mean_g))


def test_non_local_identity_at_init_and_shape_preserved():
    block = NonLocal2d(5, reduction=2)
    assert block.inter_channels == 2
    x = _features([(6, 11)], batch=2, channels=5)[0]
    out = block(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, x, rtol=0, atol=0)
    assert NonLocal2d(3, reduction=8).inter_channels == 1


def test_non_local_invalid_arguments():
    with pytest.raises(ValueError, match="in_channels"):
        NonLocal2d(0)
    with pytest.raises(ValueError, match="reduction"):
        NonLocal2d(4, reduction=0)
    with pytest.raises(ValueError, match="channels"):
        NonLocal2d(4)(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="4-D"):
        NonLocal2d(4)(torch.zeros(4, 2, 2))


def test_non_local_forward_matches_attention_map_with_gradients():
    # forward fuses the attention (scaled_dot_product_attention); attention_map spells it out.
    # float64, so that the comparison is tight (the fused CPU kernel takes float64 too)
    for use_scale in (True, False):
        block = _perturbed_non_local(8, reduction=1, use_scale=use_scale).double()
        x = _features([(9, 13)], batch=2, channels=8)[0].double().requires_grad_(True)
        fused = block(x)

        def explicit(inputs):
            attention = block.attention_map(inputs)  # [B, N, N]
            g = block.g(inputs).flatten(2).transpose(1, 2)  # [B, N, C']
            y = torch.bmm(attention, g).transpose(1, 2).reshape(2, 8, 9, 13)
            return inputs + block.conv_out(y)

        x_ref = x.detach().clone().requires_grad_(True)
        expected = explicit(x_ref)
        torch.testing.assert_close(fused, expected, rtol=1e-10, atol=1e-10)
        weights = torch.randn(fused.shape, generator=torch.Generator().manual_seed(1),
                              dtype=torch.float64)
        grads = torch.autograd.grad((fused * weights).sum(), [x, block.theta.weight])
        grads_ref = torch.autograd.grad((expected * weights).sum(), [x_ref, block.theta.weight])
        for got, want in zip(grads, grads_ref):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_non_local_deterministic_mode_uses_the_explicit_map(monkeypatch):
    block = _perturbed_non_local(8, reduction=1, use_scale=False)
    x = _features([(5, 6)], batch=1, channels=8)[0]
    with torch.no_grad():
        fused = block(x)

    def refuse(*args, **kwargs):
        raise AssertionError("fused attention called in deterministic mode")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", refuse)
    with _deterministic(True, torch.device("cpu")), torch.no_grad():  # as train.deterministic
        explicit = block(x)
    torch.testing.assert_close(explicit, fused, rtol=1e-5, atol=1e-5)


def test_non_local_passes_contiguous_inputs_to_fused_attention(monkeypatch):
    # transposed strides make the CPU dispatch fall back to the unfused (N x N) path
    seen = []
    fused = torch.nn.functional.scaled_dot_product_attention

    def record(query, key, value, **kwargs):
        seen.append([t.is_contiguous() for t in (query, key, value)])
        return fused(query, key, value, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", record)
    block = _perturbed_non_local(8, reduction=1, use_scale=False)
    block(_features([(5, 6)], batch=2, channels=8)[0])
    assert seen == [[True, True, True]]
