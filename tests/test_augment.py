"""Tests for ddlib.augment: DSA (siamese and not), DC augmentation and ZCA."""
from __future__ import annotations

import dataclasses
import io
import math

import pytest
import torch
import torch.nn.functional as F

from ddlib.augment import DEFAULT_STRATEGY, DSA, ZCA, DSADraw, DSAParams, dc_augment, default_strategy

FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def hand_draw(family: str, groups: int, size: int, **fields) -> DSADraw:
    """An identity draw of a one-family strategy with ``fields`` replaced."""
    draw = DSADraw.identity((family,), torch.zeros(groups, dtype=torch.long), size)
    return dataclasses.replace(draw, **fields)


def each(groups: int) -> torch.Tensor:
    return torch.arange(groups)


# ------------------------------------------------------------------------------------------------
# Strategy and API basics


def test_default_strategy_drops_flip_for_digits_only():
    assert default_strategy("MNIST") == "color_crop_cutout_scale_rotate"
    assert default_strategy("svhn") == "color_crop_cutout_scale_rotate"
    assert default_strategy("CIFAR10") == DEFAULT_STRATEGY
    assert default_strategy("FashionMNIST") == DEFAULT_STRATEGY
    assert DSAParams() == DSAParams(0.5, 1.2, 15.0, 0.125, 0.5, 1.0, 2.0, 0.5)


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError):
        DSA("color_blur")
    with pytest.raises(ValueError):
        dc_augment(torch.zeros(2, 1, 8, 8), gen(), strategy="crop_zoom")
    with pytest.raises(ValueError):
        DSA().sample(2, 8, gen(), op_per="sample")


@pytest.mark.parametrize("channels,size,dtype", [(1, 28, torch.float32), (3, 32, torch.float32),
                                                 (3, 8, torch.float64), (1, 224, torch.float32)])
def test_shapes_dtypes_devices_preserved(channels, size, dtype):
    batch = 2 if size == 224 else 6
    x = torch.rand(batch, channels, size, size, dtype=dtype)
    for strategy in FAMILIES + (DEFAULT_STRATEGY,):
        y = DSA(strategy)(x, gen())
        assert y.shape == x.shape and y.dtype == dtype and y.device == x.device and torch.isfinite(y).all()
    real, syn = DSA().siamese(x.view(2, -1, channels, size, size), x[:2].view(2, 1, channels, size, size), gen())
    assert real.shape == (2, batch // 2, channels, size, size) and syn.shape == (2, 1, channels, size, size)
    assert real.dtype == syn.dtype == dtype
    y = dc_augment(x, gen(), strategy="crop_scale_rotate_noise")
    assert y.shape == x.shape and y.dtype == dtype


def test_none_strategy_is_identity():
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(DSA("none")(x, gen()), x)
    assert torch.equal(dc_augment(x, gen(), strategy="none"), x)


# ------------------------------------------------------------------------------------------------
# Randomness


def test_same_seed_same_output_different_seed_different():
    x = torch.rand(16, 3, 16, 16)
    dsa = DSA()
    assert torch.equal(dsa(x, gen(1)), dsa(x, gen(1)))
    different = [not torch.equal(dsa(x, gen(1)), dsa(x, gen(seed))) for seed in range(2, 6)]
    assert all(different)
    real, syn = x.view(4, 4, 3, 16, 16), x[:8].view(4, 2, 3, 16, 16)
    a, b = dsa.siamese(real, syn, gen(3)), dsa.siamese(real, syn, gen(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], dsa.siamese(real, syn, gen(4))[0])
    assert torch.equal(dc_augment(x, gen(5)), dc_augment(x, gen(5)))
    assert not torch.equal(dc_augment(x, gen(5)), dc_augment(x, gen(6)))


def test_global_rng_untouched():
    state = torch.get_rng_state()
    x = torch.rand(8, 3, 16, 16)
    torch.set_rng_state(state)
    DSA()(x, gen())
    DSA().siamese(x.view(2, 4, 3, 16, 16), x[:4].view(2, 2, 3, 16, 16), gen())
    dc_augment(x, gen(), strategy="crop_scale_rotate_noise")
    assert torch.equal(torch.get_rng_state(), state)


def test_draws_are_reproducible_cpu_tensors():
    a = DSA().sample(5, 32, gen(7))
    b = DSA().sample(5, 32, gen(7))
    for field in dataclasses.fields(a):
        value = getattr(a, field.name)
        assert torch.equal(value, getattr(b, field.name)) if torch.is_tensor(value) else value == getattr(b, field.name)
        assert not torch.is_tensor(value) or value.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = torch.rand(32, 3, 32, 32)
    for strategy in FAMILIES:
        cpu, cuda = DSA(strategy)(x, gen(2)), DSA(strategy)(x.cuda(), gen(2))
        assert cuda.device.type == "cuda"
        torch.testing.assert_close(cuda.cpu(), cpu, atol=1e-5, rtol=1e-5)
    real, _ = DSA().siamese(x.view(4, 8, 3, 32, 32).cuda(), x[:8].view(4, 2, 3, 32, 32).cuda(), gen(1))
    ref_real, _ = DSA().siamese(x.view(4, 8, 3, 32, 32), x[:8].view(4, 2, 3, 32, 32), gen(1))
    torch.testing.assert_close(real.cpu(), ref_real, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dc_augment(x.cuda(), gen(3)).cpu(), dc_augment(x, gen(3)), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# Siamese property


def test_siamese_same_content_gives_same_output_per_class():
    classes, size = 12, 16
    real = torch.rand(classes, 5, 3, size, size)
    syn = real[:, :3].clone()
    out_real, out_syn = DSA().siamese(real, syn, gen(11))
    assert torch.equal(out_real[:, :3], out_syn)


def test_siamese_one_draw_per_class_shared_by_real_and_syn():
    classes, size = 24, 16
    # Constant images per class: if a class's samples share op and parameters, their outputs are equal.
    level = torch.rand(classes, 1, 1, 1, 1)
    real = level.expand(classes, 6, 3, size, size).clone()
    syn = level.expand(classes, 2, 3, size, size).clone()
    out_real, out_syn = DSA().siamese(real, syn, gen(5))
    assert torch.equal(out_real, out_real[:, :1].expand_as(out_real))
    assert torch.equal(out_syn, out_real[:, :2])
    # Classes draw independently: several families, and different parameters.
    draw = DSA().sample(classes, size, gen(5))
    assert len(draw.family.unique()) > 1
    changed = [not torch.equal(out_real[k], real[k]) for k in range(classes)]
    assert sum(changed) > classes // 2


def test_siamese_equals_apply_of_one_draw():
    classes, size = 6, 16
    real, syn = torch.rand(classes, 3, 3, size, size), torch.rand(classes, 2, 3, size, size)
    dsa = DSA()
    out_real, out_syn = dsa.siamese(real, syn, gen(9))
    draw = dsa.sample(classes, size, gen(9))
    expected_syn = dsa.apply(syn.flatten(0, 1), draw, torch.arange(classes).repeat_interleave(2))
    assert torch.equal(out_syn, expected_syn.view_as(syn))
    # Each sample of class k equals the class's draw applied alone.
    k = 3
    alone = dsa.apply(real[k], draw.take(torch.tensor([k])), torch.zeros(3, dtype=torch.long))
    assert torch.equal(out_real[k], alone)


def test_non_siamese_call_uses_one_family_iid_parameters():
    dsa = DSA()
    draw = dsa.sample(64, 32, gen(4), op_per="call")
    assert len(draw.family.unique()) == 1
    assert len(draw.brightness_shift.unique()) == 64 and len(draw.rotate.unique()) == 64


def test_groups_that_drew_another_family_pass_unchanged():
    size = 16
    families = ("scale", "rotate", "flip", "crop")
    draw = DSADraw.identity(families, torch.tensor([0, 1, 2, 3]), size)
    draw = dataclasses.replace(draw, scale=torch.tensor([[1.1, 0.9]] * 4), rotate=torch.full((4,), 0.2),
                               flip=torch.ones(4, dtype=torch.bool), crop_shift=torch.tensor([[1, 2]] * 4))
    x = torch.rand(8, 3, size, size)
    groups = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    y = DSA("scale_rotate_flip_crop").apply(x, draw, groups)
    # Each sample underwent only its own group's family.
    assert torch.equal(y[2], x[2].flip(-1)) and torch.equal(y[6], x[6].flip(-1))
    shifted = torch.zeros(3, size, size)
    shifted[:, :-1, :-2] = x[3, :, 1:, 2:]
    assert torch.equal(y[3], shifted)
    theta = torch.tensor([[[1.1, 0.0, 0.0], [0.0, 0.9, 0.0]]] * 2)
    scaled = F.grid_sample(x[[0, 4]], F.affine_grid(theta, [2, 3, size, size], align_corners=True), align_corners=True)
    torch.testing.assert_close(y[[0, 4]], scaled)
    assert not torch.allclose(y[1], x[1])


# ------------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("strategy", FAMILIES)
def test_gradients_flow_to_input(strategy):
    x = torch.rand(6, 3, 16, 16, requires_grad=True)
    weight = torch.rand(6, 3, 16, 16)
    draw = DSA(strategy).sample(6, 16, gen(1), op_per="call")
    if strategy == "flip":
        draw.flip[:] = True
    (DSA(strategy).apply(x, draw, torch.arange(6)) * weight).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_siamese_gradient_reaches_syn_only():
    real = torch.rand(3, 4, 3, 16, 16)
    syn = torch.rand(3, 2, 3, 16, 16, requires_grad=True)
    out_real, out_syn = DSA().siamese(real, syn, gen(2))
    assert not out_real.requires_grad
    (out_syn ** 2).sum().backward()
    assert torch.isfinite(syn.grad).all() and syn.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# Each family alone


@pytest.mark.parametrize("shift", [(0, 0), (2, -3), (-4, 4), (4, 1)])
def test_crop_moves_one_hot_pixel_exactly(shift):
    size, row, col = 16, 5, 12
    x = torch.zeros(1, 1, size, size)
    x[0, 0, row, col] = 1.0
    draw = hand_draw("crop", 1, size, crop_shift=torch.tensor([shift]))
    y = DSA("crop").apply(x, draw, each(1))
    # out[i, j] = x[i + dy, j + dx]: the pixel lands at (row - dy, col - dx), or drops off the canvas.
    new_row, new_col = row - shift[0], col - shift[1]
    expected = torch.zeros_like(x)
    if 0 <= new_row < size and 0 <= new_col < size:
        expected[0, 0, new_row, new_col] = 1.0
    assert torch.equal(y, expected)


def official_crop(x: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    """VICO rand_crop's indexing (pad 1, clamp, gather), with given translations [B]."""
    b, _, h, w = x.shape
    gb, gx, gy = torch.meshgrid(torch.arange(b), torch.arange(h), torch.arange(w), indexing="ij")
    gx = torch.clamp(gx + tx.view(-1, 1, 1) + 1, 0, h + 1)
    gy = torch.clamp(gy + ty.view(-1, 1, 1) + 1, 0, w + 1)
    x_pad = F.pad(x, [1, 1, 1, 1, 0, 0, 0, 0])
    return x_pad.permute(0, 2, 3, 1).contiguous()[gb, gx, gy].permute(0, 3, 1, 2)


def official_cutout(x: torch.Tensor, ox: torch.Tensor, oy: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """VICO rand_cutout's mask (clamped box indices), with given offsets [B]."""
    b, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    gb, gx, gy = torch.meshgrid(torch.arange(b), torch.arange(sh), torch.arange(sw), indexing="ij")
    gx = torch.clamp(gx + ox.view(-1, 1, 1) - sh // 2, min=0, max=h - 1)
    gy = torch.clamp(gy + oy.view(-1, 1, 1) - sw // 2, min=0, max=w - 1)
    mask = torch.ones(b, h, w)
    mask[gb, gx, gy] = 0
    return x * mask.unsqueeze(1)


@pytest.mark.parametrize("size", [8, 15, 32])
def test_crop_and_cutout_match_official_indexing(size):
    x = torch.rand(40, 3, size, size)
    crop = DSA("crop").sample(40, size, gen(3), op_per="call")
    y = DSA("crop").apply(x, crop, each(40))
    shift = int(size * 0.125 + 0.5)
    assert crop.crop_shift.abs().max() <= shift and crop.crop_shift.abs().max() > 0
    assert torch.equal(y, official_crop(x, crop.crop_shift[:, 0], crop.crop_shift[:, 1]))
    cut = DSA("cutout").sample(40, size, gen(4), op_per="call")
    y = DSA("cutout").apply(x, cut, each(40))
    assert torch.equal(y, official_cutout(x, cut.cutout_centre[:, 0], cut.cutout_centre[:, 1]))
    box = int(size * 0.5 + 0.5)
    zeroed = (y == 0).all(1).sum((1, 2))
    assert (zeroed <= box * box).all() and (zeroed > 0).all()


def test_flip_is_exact():
    x = torch.rand(32, 3, 8, 8)
    dsa = DSA("flip")
    draw = dsa.sample(32, 8, gen(8), op_per="call")
    y = dsa.apply(x, draw, each(32))
    assert 0 < int(draw.flip.sum()) < 32
    for b in range(32):
        assert torch.equal(y[b], x[b].flip(-1) if draw.flip[b] else x[b])


@pytest.mark.parametrize("family", ["scale", "rotate", "crop", "cutout", "color", "flip"])
def test_identity_draw_is_exact_identity(family):
    x = torch.rand(4, 3, 28, 28)
    draw = hand_draw(family, 4, 28)
    assert torch.equal(DSA(family).apply(x, draw, each(4)), x)


def test_scale_and_rotate_follow_official_theta():
    size = 16
    x = torch.rand(3, 1, size, size)
    # A quarter turn with align_corners=True is an exact pixel permutation: out[i, j] = x[j, W-1-i].
    draw = hand_draw("rotate", 3, size, rotate=torch.full((3,), math.pi / 2))
    torch.testing.assert_close(DSA("rotate").apply(x, draw, each(3)), torch.rot90(x, 1, (2, 3)), atol=1e-5, rtol=0)
    # Scale by 1/2 on x only samples the middle half of the columns, stretched.
    draw = hand_draw("scale", 3, size, scale=torch.tensor([[0.5, 1.0]] * 3))
    y = DSA("scale").apply(x, draw, each(3))
    torch.testing.assert_close(y[..., 0], x[..., size // 4] * 0.75 + x[..., size // 4 - 1] * 0.25, atol=1e-5, rtol=0)
    draws = DSA("scale_rotate").sample(200, size, gen(1))
    assert draws.scale.min() >= 1 / 1.2 and draws.scale.max() <= 1.2
    assert draws.rotate.abs().max() <= math.radians(15) and draws.rotate.abs().max() > math.radians(13)


def test_color_ops_follow_official_formulas():
    x = torch.rand(2, 3, 8, 8)
    draw = hand_draw("color", 2, 8, brightness_shift=torch.tensor([0.3, -0.2]),
                     saturation_factor=torch.tensor([1.5, 0.0]), contrast_factor=torch.tensor([0.7, 1.4]))
    y = DSA("color").apply(x, draw, each(2))
    b = x + torch.tensor([0.3, -0.2]).view(-1, 1, 1, 1)
    m = b.mean(1, keepdim=True)
    s = (b - m) * torch.tensor([1.5, 0.0]).view(-1, 1, 1, 1) + m
    m = s.mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(y, (s - m) * torch.tensor([0.7, 1.4]).view(-1, 1, 1, 1) + m)
    # Saturation does nothing to grey images; the random ranges are the official ones.
    grey = torch.rand(2, 1, 8, 8)
    sat = hand_draw("color", 2, 8, saturation_factor=torch.tensor([1.9, 0.1]))
    torch.testing.assert_close(DSA("color").apply(grey, sat, each(2)), grey)
    draws = DSA("color").sample(500, 8, gen(0))
    assert draws.brightness_shift.abs().max() <= 0.5 and draws.saturation_factor.max() <= 2.0
    assert draws.contrast_factor.min() >= 0.5 and draws.contrast_factor.max() <= 1.5


# ------------------------------------------------------------------------------------------------
# DC augmentation


def test_dc_noise_magnitude():
    x = torch.rand(64, 1, 28, 28)
    y = dc_augment(x, gen(), strategy="noise")
    assert abs(float((y - x).std()) - 0.001) < 1e-4 and (y - x).abs().max() < 0.01


def test_dc_crop_shifts_with_mean_fill():
    x = torch.rand(64, 3, 12, 12)
    y = dc_augment(x, gen(2), strategy="crop", crop=4)
    g = gen(2)
    torch.randint(1, (64,), generator=g)  # the family choice
    offsets = torch.randint(8, (64, 2), generator=g)
    mean = x.mean((0, 2, 3))
    for b in range(64):
        padded = mean.view(3, 1, 1).expand(3, 20, 20).clone()
        padded[:, 4:16, 4:16] = x[b]
        r, c = offsets[b].tolist()
        assert torch.equal(y[b], padded[:, r:r + 12, c:c + 12])


def test_dc_scale_matches_official_loop():
    x = torch.rand(32, 1, 28, 28)
    y = dc_augment(x, gen(3), strategy="scale", scale=0.2)
    g = gen(3)
    torch.randint(1, (32,), generator=g)
    factors = torch.rand(32, 2, generator=g, dtype=torch.float64) * 0.4 + 0.8
    for b in range(32):
        h, w = int(factors[b, 0] * 28), int(factors[b, 1] * 28)
        tmp = F.interpolate(x[b:b + 1], [h, w])[0]
        mhw = max(h, w, 28)
        canvas = torch.zeros(1, mhw, mhw)
        canvas[:, (mhw - h) // 2:(mhw - h) // 2 + h, (mhw - w) // 2:(mhw - w) // 2 + w] = tmp
        r = (mhw - 28) // 2
        assert torch.equal(y[b], canvas[:, r:r + 28, r:r + 28])


def test_dc_rotate_matches_scipy_geometry():
    ndimage = pytest.importorskip("scipy.ndimage")
    size = 28
    grid = torch.linspace(-1, 1, size)
    # A smooth image, so that spline vs bicubic interpolation differ little.
    smooth = torch.exp(-((grid.view(-1, 1) - 0.2) ** 2 + (grid.view(1, -1) + 0.1) ** 2) * 3)
    x = smooth.expand(16, 1, size, size).clone()
    y = dc_augment(x, gen(4), strategy="rotate")
    g = gen(4)
    torch.randint(1, (16,), generator=g)
    degrees = torch.randint(-45, 45, (16,), generator=g)
    cval = float(x.mean())
    for b in range(16):
        ref = ndimage.rotate(x[b].numpy(), angle=int(degrees[b]), axes=(-2, -1), cval=cval)
        r, c = (ref.shape[-2] - size) // 2, (ref.shape[-1] - size) // 2
        ref = torch.from_numpy(ref[:, r:r + size, c:c + size])
        assert (y[b] - ref).abs().max() < 0.02, int(degrees[b])


def test_dc_one_op_per_image():
    x = torch.rand(64, 1, 16, 16)
    y = dc_augment(x, gen(1), strategy="crop_scale_rotate")
    changed = (y != x).flatten(1).any(1)
    assert changed.float().mean() > 0.5  # most images change (a zero crop shift or a unit scale need not)


# ------------------------------------------------------------------------------------------------
# ZCA


def test_zca_round_trip_whitening_and_state_dict():
    g = gen(0)
    mixing = torch.randn(48, 48, generator=g, dtype=torch.float64) * torch.linspace(0.05, 2, 48, dtype=torch.float64)
    x = (torch.randn(3000, 48, generator=g, dtype=torch.float64) @ mixing + 0.5).view(3000, 3, 4, 4)
    zca = ZCA.fit(x, eps=1e-8)
    white = zca.transform(x)
    assert white.shape == x.shape
    flat = white.flatten(1)
    cov = (flat - flat.mean(0)).T @ (flat - flat.mean(0)) / (len(flat) - 1)
    torch.testing.assert_close(cov, torch.eye(48, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(zca.inverse(white), x, atol=1e-8, rtol=0)

    fitted = ZCA.fit(x.float(), eps=0.1)
    torch.testing.assert_close(fitted.inverse(fitted.transform(x.float())), x.float(), atol=1e-4, rtol=1e-4)
    buffer = io.BytesIO()
    torch.save(fitted.state_dict(), buffer)
    buffer.seek(0)
    restored = ZCA.from_state_dict(torch.load(buffer, weights_only=True))
    assert restored.eps == 0.1
    assert torch.equal(restored.transform(x.float()), fitted.transform(x.float()))


def test_zca_matches_kornia_formula():
    x = torch.rand(500, 1, 4, 4, generator=gen(1))
    flat = x.flatten(1)
    centred = flat - flat.mean(0)
    u, s, _ = torch.linalg.svd(centred.T @ centred / (len(flat) - 1))
    transform = u @ torch.diag((s + 0.1).rsqrt()) @ u.T
    expected = (centred @ transform).view_as(x)
    torch.testing.assert_close(ZCA.fit(x).transform(x), expected, atol=1e-4, rtol=1e-4)
