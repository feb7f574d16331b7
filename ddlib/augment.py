"""Augmentations: DSA (differentiable Siamese augmentation), DC's evaluation augmentation, and ZCA.

DSA follows VICO ``utils.py`` (``DiffAugment`` in aug_mode 'S', ``rand_*``) op for op, with two changes
that keep results the same in distribution but make them fast and reproducible:

* the official code reseeds the *global* RNG from a per-class seed so that a class's real and synthetic
  batches get "sample 0's draw"; here a :class:`DSADraw` holds one draw per *group* (a class), and every
  sample looks its group's draw up through a ``groups`` index, so all classes go through one batched call;
* all draws come from an explicit CPU ``torch.Generator`` (same numbers on CPU and GPU).

Each sample gets exactly one op family (``'S'`` mode). A sample whose group drew another family, or an
identity draw of this one, skips the family's code entirely, so it comes out bit-for-bit unchanged.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DEFAULT_STRATEGY",
    "DSA",
    "ZCA",
    "DSADraw",
    "DSAParams",
    "dc_augment",
    "default_strategy",
]

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
DSA_FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")
DC_OPS = ("crop", "scale", "rotate", "noise")
# VICO readme: horizontal flips change a digit's identity, so digit datasets drop 'flip'.
_NO_FLIP_DATASETS = frozenset({"mnist", "digits", "svhn"})


@dataclass
class DSAParams:
    """Strengths of the DSA ops (VICO ``ParamDiffAug`` defaults)."""

    prob_flip: float = 0.5  # probability of a horizontal flip
    ratio_scale: float = 1.2  # scale factors ~ U[1/ratio, ratio], per axis
    ratio_rotate: float = 15.0  # rotation angle ~ U[-ratio, ratio], degrees
    ratio_crop_pad: float = 0.125  # max translation, as a fraction of the image side
    ratio_cutout: float = 0.5  # cutout box side, as a fraction of the image side
    brightness: float = 1.0  # additive shift ~ (U[0,1) - 0.5) * brightness
    saturation: float = 2.0  # chroma factor ~ U[0,1) * saturation
    contrast: float = 0.5  # contrast factor ~ U[0,1) + contrast


def default_strategy(dataset: str) -> str:
    """The DSA strategy VICO uses for ``dataset``: the full one, minus 'flip' for digit datasets."""
    name = dataset.lower().replace("-", "").replace("_", "")
    if name in _NO_FLIP_DATASETS:
        return DEFAULT_STRATEGY.replace("_flip", "")
    return DEFAULT_STRATEGY


def _pair(size: tuple[int, int] | int) -> tuple[int, int]:
    """``(H, W)`` from an int or a pair."""
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def _check_cpu_generator(generator: torch.Generator) -> None:
    """Draws must come from a CPU generator, so results do not depend on the data's device."""
    if generator.device.type != "cpu":
        raise ValueError(f"ddlib.augment draws on CPU; got a generator on {generator.device}")


# --------------------------------------------------------------------------------------------------
# DSA draws


@dataclass
class DSADraw:
    """One DSA draw per group: the op family each group gets and that op's parameters.

    Every tensor is on CPU and has the groups on dim 0 (``G`` rows). Parameters of families a group
    did not draw are drawn anyway (keeps the random stream simple) and ignored.
    """

    families: tuple[str, ...]  # the strategy's op families; `family` indexes into this
    image_size: tuple[int, int]  # (H, W) px the crop/cutout draws were made for
    family: Tensor  # [G] long: index into `families`
    brightness_shift: Tensor  # [G] float: added to every pixel
    saturation_factor: Tensor  # [G] float: multiplies the deviation from the channel mean
    contrast_factor: Tensor  # [G] float: multiplies the deviation from the image mean
    crop_shift: Tensor  # [G, 2] long (rows, cols) px: out[i, j] = in[i + dy, j + dx], zero outside
    cutout_centre: Tensor  # [G, 2] long (row, col) px of the zeroed box (official offset convention)
    flip: Tensor  # [G] bool: mirror left-right
    scale: Tensor  # [G, 2] float (sx, sy): sampling-grid factors on (cols, rows); >1 shrinks the content
    rotate: Tensor  # [G] float, radians: theta [[cos, -sin, 0], [sin, cos, 0]] as in the official code

    @property
    def num_groups(self) -> int:
        """``G``, the number of groups."""
        return int(self.family.shape[0])

    @classmethod
    def identity(cls, families: tuple[str, ...], family: Tensor, image_size: tuple[int, int] | int) -> DSADraw:
        """A draw that leaves images unchanged (cutout box off-canvas), a base for hand-made draws.

        ``family`` [G] long picks each group's family; replace fields with ``dataclasses.replace``.
        """
        groups = int(family.shape[0])
        height, width = _pair(image_size)
        return cls(
            families=tuple(families),
            image_size=(height, width),
            family=family.to("cpu", torch.long),
            brightness_shift=torch.zeros(groups),
            saturation_factor=torch.ones(groups),
            contrast_factor=torch.ones(groups),
            crop_shift=torch.zeros(groups, 2, dtype=torch.long),
            # A centre far outside the image puts the cutout box off-canvas.
            cutout_centre=torch.full((groups, 2), -(height + width), dtype=torch.long),
            flip=torch.zeros(groups, dtype=torch.bool),
            scale=torch.ones(groups, 2),
            rotate=torch.zeros(groups),
        )

    def take(self, index: Tensor) -> DSADraw:
        """The draw rows ``index`` [n] (CPU long): turns per-group draws into per-sample ones."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in fields.items():
            if isinstance(value, Tensor):
                fields[name] = value.index_select(0, index)
        return DSADraw(**fields)

    def changes(self, family_name: str) -> Tensor:
        """[G] bool: groups that drew ``family_name`` with parameters that may change an image."""
        if family_name not in self.families:
            return torch.zeros(self.num_groups, dtype=torch.bool)
        chosen = self.family == self.families.index(family_name)
        # Skipping identity draws keeps untouched rows bit-exact (an identity grid_sample is not).
        if family_name == "color":
            neutral = (self.brightness_shift == 0) & (self.saturation_factor == 1) & (self.contrast_factor == 1)
            return chosen & ~neutral
        if family_name == "crop":
            return chosen & (self.crop_shift != 0).any(1)
        if family_name == "flip":
            return chosen & self.flip
        if family_name == "scale":
            return chosen & (self.scale != 1).any(1)
        if family_name == "rotate":
            return chosen & (self.rotate != 0)
        return chosen


def _parse_strategy(strategy: str, known: tuple[str, ...]) -> tuple[str, ...]:
    """The op names of an underscore-joined strategy ('' or 'none': no op)."""
    if strategy.lower() in ("", "none"):
        return ()
    names = tuple(strategy.split("_"))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown augmentation(s) {unknown} in {strategy!r}; known: {known}")
    return names


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    """[n] float32 ~ U[low, high), drawn as the official ``torch.rand(n) * (high - low) + low``."""
    return torch.rand(n, generator=generator) * (high - low) + low


def _draw_groups(families: tuple[str, ...], num_groups: int, image_size: tuple[int, int],
                 params: DSAParams, generator: torch.Generator, op_per: str) -> DSADraw:
    """Draws a :class:`DSADraw` in the official order: family, then colour, crop, cutout, flip, scale, rotate."""
    g, (height, width) = num_groups, image_size
    if op_per == "group":
        family = torch.randint(len(families), (g,), generator=generator)
    elif op_per == "call":
        family = torch.randint(len(families), (1,), generator=generator).expand(g).clone()
    else:
        raise ValueError(f"op_per must be 'group' or 'call', got {op_per!r}")
    brightness_shift = (torch.rand(g, generator=generator) - 0.5) * params.brightness
    saturation_factor = torch.rand(g, generator=generator) * params.saturation
    contrast_factor = torch.rand(g, generator=generator) + params.contrast
    shift_h, shift_w = int(height * params.ratio_crop_pad + 0.5), int(width * params.ratio_crop_pad + 0.5)
    crop_shift = torch.stack([torch.randint(-shift_h, shift_h + 1, (g,), generator=generator),
                              torch.randint(-shift_w, shift_w + 1, (g,), generator=generator)], 1)
    cut_h, cut_w = _cutout_size((height, width), params.ratio_cutout)
    # The official range has one more value for even box sides, which lets the box leave either edge.
    cutout_centre = torch.stack([torch.randint(0, height + (1 - cut_h % 2), (g,), generator=generator),
                                 torch.randint(0, width + (1 - cut_w % 2), (g,), generator=generator)], 1)
    flip = torch.rand(g, generator=generator) < params.prob_flip
    ratio = params.ratio_scale
    scale = torch.stack([_uniform(g, 1 / ratio, ratio, generator), _uniform(g, 1 / ratio, ratio, generator)], 1)
    rotate = (torch.rand(g, generator=generator) - 0.5) * 2 * params.ratio_rotate / 180 * math.pi
    return DSADraw(families, (height, width), family, brightness_shift, saturation_factor, contrast_factor,
                   crop_shift, cutout_centre, flip, scale, rotate)


# --------------------------------------------------------------------------------------------------
# DSA ops: each takes x [n,C,H,W] and the per-sample draw (n rows), and returns [n,C,H,W]


def _per_sample(values: Tensor, x: Tensor) -> Tensor:
    """[n] CPU values as an [n,1,1,1] tensor on x's device and dtype, ready to broadcast."""
    return values.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def _cutout_size(image_size: tuple[int, int], ratio: float) -> tuple[int, int]:
    """Cutout box side in px, per axis (official rounding)."""
    return int(image_size[0] * ratio + 0.5), int(image_size[1] * ratio + 0.5)


def _color(x: Tensor, draw: DSADraw) -> Tensor:
    """Brightness, then saturation, then contrast, each with its own draw (official 'color')."""
    x = x + _per_sample(draw.brightness_shift, x)
    channel_mean = x.mean(dim=1, keepdim=True)
    x = (x - channel_mean) * _per_sample(draw.saturation_factor, x) + channel_mean
    image_mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - image_mean) * _per_sample(draw.contrast_factor, x) + image_mean


def _gather_shifted(x: Tensor, row_src: Tensor, col_src: Tensor, fill: float | Tensor = 0.0) -> Tensor:
    """out[b,c,i,j] = x[b,c,row_src[b,i],col_src[b,j]], or ``fill`` where a source index is off-image.

    x [B,C,H,W]; row_src [B,H'] and col_src [B,W'] long on x's device; fill a scalar or [1,C,1,1].
    As the official crop: pad one ring of ``fill``, clamp off-image indices onto it, one flat gather.
    """
    batch, channels, height, width = x.shape
    if torch.is_tensor(fill):
        padded = fill.expand(batch, channels, height + 2, width + 2).clone()
        padded[:, :, 1:-1, 1:-1] = x
    else:
        padded = F.pad(x, [1, 1, 1, 1], value=float(fill))
    rows = row_src.clamp(-1, height) + 1
    cols = col_src.clamp(-1, width) + 1
    flat_index = (rows[:, :, None] * (width + 2) + cols[:, None, :]).view(batch, 1, -1)
    out = padded.view(batch, channels, -1).gather(2, flat_index.expand(-1, channels, -1))
    out = out.view(batch, channels, row_src.shape[1], col_src.shape[1])
    return out


def _crop(x: Tensor, draw: DSADraw) -> Tensor:
    """Integer translation with zero fill (official pad-and-crop): out[i,j] = x[i+dy, j+dx]."""
    shift = draw.crop_shift.to(x.device)
    rows = torch.arange(x.shape[2], device=x.device) + shift[:, :1]
    cols = torch.arange(x.shape[3], device=x.device) + shift[:, 1:]
    return _gather_shifted(x, rows, cols)


def _cutout_for(ratio: float) -> Callable[[Tensor, DSADraw], Tensor]:
    """The cutout op for box side ``ratio`` × image side."""

    def cutout(x: Tensor, draw: DSADraw) -> Tensor:
        """Zeroes a box of side ``size`` whose first row/col is ``centre - size // 2`` (clipped to the image)."""
        size_h, size_w = _cutout_size((x.shape[2], x.shape[3]), ratio)
        start = draw.cutout_centre.to(x.device) - torch.tensor([size_h // 2, size_w // 2], device=x.device)
        rows = torch.arange(x.shape[2], device=x.device)
        cols = torch.arange(x.shape[3], device=x.device)
        in_rows = (rows >= start[:, :1]) & (rows < start[:, :1] + size_h)
        in_cols = (cols >= start[:, 1:]) & (cols < start[:, 1:] + size_w)
        keep = ~(in_rows[:, None, :, None] & in_cols[:, None, None, :])
        return x * keep.to(x.dtype)

    return cutout


def _flip(x: Tensor, draw: DSADraw) -> Tensor:
    """Left-right mirror (only rows whose draw says flip ever reach here)."""
    return x.flip(3)


def _affine(x: Tensor, theta: Tensor) -> Tensor:
    """Official affine warp: theta [n,2,3] maps output to input coords (bilinear, zero pad, align_corners)."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def _scale(x: Tensor, draw: DSADraw) -> Tensor:
    """Independent x/y scaling of the sampling grid: theta [[sx,0,0],[0,sy,0]]."""
    scale = draw.scale.to(device=x.device, dtype=x.dtype)
    theta = torch.zeros(x.shape[0], 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 1, 1] = scale[:, 0], scale[:, 1]
    return _affine(x, theta)


def _rotate(x: Tensor, draw: DSADraw) -> Tensor:
    """Rotation about the centre: theta [[cos,-sin,0],[sin,cos,0]] (official ``sin(-θ)`` entry)."""
    angle = draw.rotate.to(device=x.device, dtype=x.dtype)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.zeros(x.shape[0], 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos
    return _affine(x, theta)


def _apply_to_rows(x: Tensor, rows: Tensor, op: Callable[[Tensor, DSADraw], Tensor], draw: DSADraw) -> Tensor:
    """Applies ``op`` to the samples ``rows`` (CPU long, sorted) with their draws; others pass unchanged.

    x [B,C,H,W]; draw is per-sample for exactly ``rows``. Out-of-place ``index_copy`` keeps autograd.
    """
    if rows.numel() == x.shape[0]:  # every sample: no need to gather and scatter
        return op(x, draw)
    rows_on_device = rows.to(x.device, non_blocking=True)
    return x.index_copy(0, rows_on_device, op(x.index_select(0, rows_on_device), draw))


# --------------------------------------------------------------------------------------------------
# DSA


class DSA:
    """Differentiable Siamese augmentation ('S' mode: one op family per sample group).

    ``dsa(x, g)`` augments like evaluation and inner-loop training (one family per call, i.i.d.
    parameters per sample); ``dsa.siamese(real, syn, g)`` gives each class one shared draw.
    """

    # The shared default instance is safe: __init__ keeps a private copy.
    def __init__(self, strategy: str = DEFAULT_STRATEGY, params: DSAParams = DSAParams()):  # noqa: B008
        self.strategy = strategy
        self.families = _parse_strategy(strategy, DSA_FAMILIES)
        self.params = dataclasses.replace(params)  # a private copy: the default instance is shared
        self._ops: dict[str, Callable[[Tensor, DSADraw], Tensor]] = {
            "color": _color, "crop": _crop, "cutout": _cutout_for(self.params.ratio_cutout),
            "flip": _flip, "scale": _scale, "rotate": _rotate,
        }

    def __repr__(self) -> str:
        return f"DSA(strategy={self.strategy!r}, params={self.params})"

    def sample(self, num_groups: int, image_size: tuple[int, int] | int, generator: torch.Generator,
               *, op_per: str = "group") -> DSADraw:
        """Draws each of ``num_groups`` groups' family and parameters, on CPU, from ``generator``.

        ``op_per="group"``: an independent family per group (siamese, one group per class);
        ``op_per="call"``: one family for all groups, as the official non-siamese call does.
        """
        _check_cpu_generator(generator)
        if not self.families:
            return DSADraw.identity((), torch.zeros(num_groups, dtype=torch.long), image_size)
        return _draw_groups(self.families, num_groups, _pair(image_size), self.params, generator, op_per)

    def apply(self, x: Tensor, draw: DSADraw, groups: Tensor) -> Tensor:
        """Augments x [B,C,H,W] (any device); sample b uses group ``groups[b]``'s draw. Differentiable in x."""
        if x.dim() != 4 or groups.shape != (x.shape[0],):
            raise ValueError(f"need x [B,C,H,W] and groups [B]; got {tuple(x.shape)} and {tuple(groups.shape)}")
        if tuple(x.shape[2:]) != draw.image_size:
            raise ValueError(f"draw made for {draw.image_size} px images, x is {tuple(x.shape[2:])}")
        groups = groups.to("cpu", torch.long)  # one sync; all row bookkeeping then stays on CPU
        for name in draw.families:
            rows = draw.changes(name)[groups].nonzero().squeeze(1)
            if rows.numel():
                x = _apply_to_rows(x, rows, self._ops[name], draw.take(groups[rows]))
        return x

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Non-siamese DSA of x [B,C,H,W]: one family for the call, i.i.d. parameters per sample."""
        draw = self.sample(x.shape[0], (x.shape[2], x.shape[3]), generator, op_per="call")
        return self.apply(x, draw, torch.arange(x.shape[0]))

    def siamese(self, real: Tensor, syn: Tensor, generator: torch.Generator, *,
                classes: slice | None = None, num_classes: int = 0) -> tuple[Tensor, Tensor]:
        """Siamese DSA of real [K,n_r,C,H,W] and syn [K,n_s,C,H,W]: class k's images share one draw.

        Classes draw independently. Returns tensors of the input shapes. With ``classes`` (a slice of
        ``num_classes``), real and syn hold only those classes: the draw is made for all ``num_classes``
        (the stream of a full call) and only their rows are applied, as a class-sharded rank needs.
        """
        if real.dim() != 5 or syn.dim() != 5 or real.shape[0] != syn.shape[0] or real.shape[2:] != syn.shape[2:]:
            raise ValueError(f"need real [K,n_r,C,H,W] and syn [K,n_s,C,H,W]; "
                             f"got {tuple(real.shape)}, {tuple(syn.shape)}")
        total = real.shape[0] if classes is None else num_classes
        draw = self.sample(total, (real.shape[3], real.shape[4]), generator, op_per="group")
        if classes is not None:
            rows = torch.arange(total)[classes]
            if rows.numel() != real.shape[0]:
                raise ValueError(f"classes {classes} of {total} do not match the {real.shape[0]} classes given")
            draw = draw.take(rows)
        return self._apply_per_class(real, draw), self._apply_per_class(syn, draw)

    def _apply_per_class(self, x: Tensor, draw: DSADraw) -> Tensor:
        """Applies ``draw`` to x [K,n,C,H,W], group k for every image of class k."""
        classes, per_class = x.shape[:2]
        groups = torch.arange(classes).repeat_interleave(per_class)
        return self.apply(x.flatten(0, 1), draw, groups).reshape(x.shape)


# --------------------------------------------------------------------------------------------------
# DC evaluation augmentation (VICO utils.py:augment), batched


def _dc_crop(x: Tensor, offsets: Tensor, crop: int, fill: Tensor) -> Tensor:
    """Pad by ``crop`` px with ``fill`` [1,C,1,1] and crop at ``offsets`` [B,2] (rows, cols) ∈ [0, 2·crop)."""
    shift = offsets.to(x.device) - crop
    rows = torch.arange(x.shape[2], device=x.device) + shift[:, :1]
    cols = torch.arange(x.shape[3], device=x.device) + shift[:, 1:]
    return _gather_shifted(x, rows, cols, fill)


def _nearest_resize_index(out_size: Tensor, in_size: int, canvas: Tensor, window: int) -> Tensor:
    """Source indices [B, window] of the official scale: nearest-resize to ``out_size``, centre on a square
    canvas of side ``canvas``, crop the centred ``window``; -1 where the canvas is empty (zero fill).
    """
    device = out_size.device
    position = (torch.arange(window, device=device) + (canvas[:, None] - window) // 2
                - (canvas[:, None] - out_size[:, None]) // 2)
    # F.interpolate(mode="nearest"): src = floor(dst * (float32)in/out), as in ATen's nearest kernel.
    ratio = torch.tensor(float(in_size), dtype=torch.float32, device=device) / out_size.to(torch.float32)
    source = (position.to(torch.float32) * ratio[:, None]).floor().long().clamp(max=in_size - 1)
    return torch.where((position >= 0) & (position < out_size[:, None]), source, -1)


def _dc_scale(x: Tensor, factors: Tensor) -> Tensor:
    """Resize to (int(f_h·H), int(f_w·H)) nearest, centre, zero-fill/crop back to H×W; factors [B,2]."""
    height, width = x.shape[2], x.shape[3]
    # The official code scales both sides from shape[2] (the height); identical for square images.
    sizes = (factors.double() * height).long().to(x.device)
    canvas = torch.stack([sizes[:, 0], sizes[:, 1], torch.full_like(sizes[:, 0], max(height, width))], 1).amax(1)
    rows = _nearest_resize_index(sizes[:, 0], height, canvas, height)
    cols = _nearest_resize_index(sizes[:, 1], width, canvas, width)
    return _gather_shifted(x, rows, cols)


def _dc_rotate(x: Tensor, degrees: Tensor, fill: float) -> Tensor:
    """scipy ``rotate(reshape=True, cval=fill)`` then centre crop, as one bicubic grid_sample; degrees [B].

    Reproduces scipy's geometry exactly (including the half-pixel offset when the reshaped side's parity
    differs) and its 'constant' mode: ``fill`` wherever the source point is off the input grid, mirror
    taps inside. The interpolant is torch's bicubic instead of scipy's cubic spline.
    """
    height, width = x.shape[2], x.shape[3]
    angle = torch.deg2rad(degrees.double())
    cos, sin = angle.cos(), angle.sin()
    # scipy's reshaped output plane: the rotated input's bounding box, rounded.
    out_h = (cos.abs() * height + sin.abs() * width + 0.5).floor()
    out_w = (sin.abs() * height + cos.abs() * width + 0.5).floor()
    # Output pixel (i, j) of the crop sits at offset (i + top - (out_h-1)/2) from the reshaped plane's centre.
    top, left = ((out_h - height) / 2).floor(), ((out_w - width) / 2).floor()
    d_row = torch.arange(height, dtype=torch.float64)[None, :] + (top - (out_h - 1) / 2)[:, None]  # [B,H]
    d_col = torch.arange(width, dtype=torch.float64)[None, :] + (left - (out_w - 1) / 2)[:, None]  # [B,W]
    cos, sin = cos[:, None, None], sin[:, None, None]
    # scipy maps output to input with [[c, s], [-s, c]] on (row, col).
    src_row = cos * d_row[:, :, None] + sin * d_col[:, None, :] + (height - 1) / 2  # [B,H,W] px
    src_col = -sin * d_row[:, :, None] + cos * d_col[:, None, :] + (width - 1) / 2
    tolerance = 1e-6  # absorbs float error at exact grid points (0 and ±90 degrees)
    inside = ((src_row >= -tolerance) & (src_row <= height - 1 + tolerance)
              & (src_col >= -tolerance) & (src_col <= width - 1 + tolerance))
    grid = torch.stack([2 * src_col / (width - 1) - 1, 2 * src_row / (height - 1) - 1], -1)
    grid = grid.to(device=x.device, dtype=x.dtype)
    # Reflection about the edge pixel centres (align_corners=True) is scipy's 'mirror' extension.
    rotated = F.grid_sample(x, grid, mode="bicubic", padding_mode="reflection", align_corners=True)
    return torch.where(inside.to(x.device)[:, None], rotated, fill)


def dc_augment(x: Tensor, generator: torch.Generator, strategy: str = "crop_scale_rotate",
               scale: float = 0.2, crop: int = 4, rotate: float = 45.0, noise: float = 0.001) -> Tensor:
    """DC's evaluation augmentation of x [B,C,H,W]: each image gets one op drawn uniformly from ``strategy``.

    crop: pad ``crop`` px with the batch's channel means, random crop; scale: nearest-resize each side by
    U(1-scale, 1+scale), centred, zero fill; rotate: integer degrees in [-rotate, rotate), filled with the
    mean of channel means; noise: + noise·N(0,1). Draws come from ``generator`` (CPU); returns a new tensor.
    """
    _check_cpu_generator(generator)
    ops = _parse_strategy(strategy, DC_OPS)
    if not ops:
        return x.clone()
    batch, channels = x.shape[:2]
    choice = torch.randint(len(ops), (batch,), generator=generator)
    # The official code takes these means once, before any image is changed.
    channel_mean = x.detach().mean(dim=(0, 2, 3)).view(1, channels, 1, 1)
    out = x
    for code, op in enumerate(ops):
        rows = (choice == code).nonzero().squeeze(1)
        params = _dc_draw(op, rows.numel(), x.shape, generator, scale, crop, rotate)
        if rows.numel() == 0:
            continue
        transform = _dc_op(op, params, channel_mean, crop, noise)
        rows_on_device = rows.to(x.device)
        out = out.index_copy(0, rows_on_device, transform(x.index_select(0, rows_on_device)))
    return out


def _dc_draw(op: str, n: int, shape: torch.Size, generator: torch.Generator,
             scale: float, crop: int, rotate: float) -> Tensor:
    """The random parameters of DC op ``op`` for n images (CPU): offsets, factors, degrees or noise."""
    if op == "crop":
        return torch.randint(max(2 * crop, 1), (n, 2), generator=generator)
    if op == "scale":
        return torch.rand(n, 2, generator=generator, dtype=torch.float64) * (2 * scale) + (1 - scale)
    if op == "rotate":
        return torch.randint(-int(rotate), int(rotate), (n,), generator=generator).double()
    return torch.randn(n, *shape[1:], generator=generator)


def _dc_op(op: str, params: Tensor, channel_mean: Tensor, crop: int, noise: float) -> Callable[[Tensor], Tensor]:
    """The DC op ``op`` with its drawn ``params``, as a function of the chosen images [n,C,H,W]."""
    if op == "crop":
        return lambda x: _dc_crop(x, params, crop, channel_mean.to(x.dtype))
    if op == "scale":
        return lambda x: _dc_scale(x, params)
    if op == "rotate":
        return lambda x: _dc_rotate(x, params, float(channel_mean.mean()))
    return lambda x: x + noise * params.to(device=x.device, dtype=x.dtype)


# --------------------------------------------------------------------------------------------------
# ZCA whitening (kornia ZCAWhitening(eps, compute_inv=True) semantics)


class ZCA:
    """ZCA whitening fitted on a dataset: y = (x - mean) · T with T = U (S + eps)^(-1/2) Uᵀ.

    Images are flattened to D = C·H·W features; ``inverse`` maps whitened images back.
    """

    def __init__(self, mean: Tensor, transform_matrix: Tensor, inverse_matrix: Tensor, eps: float):
        self.mean = mean  # [D]
        self.transform_matrix = transform_matrix  # [D, D], symmetric
        self.inverse_matrix = inverse_matrix  # [D, D], symmetric: U (S + eps)^(1/2) Uᵀ
        self.eps = float(eps)

    @classmethod
    def fit(cls, x: Tensor, eps: float = 0.1) -> ZCA:
        """Fits on x [N,C,H,W] (N ≥ 2), on x's device: unbiased covariance, eigendecomposition in float64."""
        if x.shape[0] < 2:
            raise ValueError("ZCA.fit needs at least two samples")
        flat = x.reshape(x.shape[0], -1)
        mean = flat.mean(dim=0)
        centred = flat - mean
        covariance = centred.T @ centred / (flat.shape[0] - 1)
        # eigh of the symmetric covariance equals kornia's SVD; float64 keeps tiny eigenvalues accurate.
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())
        eigenvalues = eigenvalues.clamp_min(0)  # round-off can make null directions slightly negative
        transform_matrix = (eigenvectors * (eigenvalues + eps).rsqrt()) @ eigenvectors.T
        inverse_matrix = (eigenvectors * (eigenvalues + eps).sqrt()) @ eigenvectors.T
        return cls(mean, transform_matrix.to(x.dtype), inverse_matrix.to(x.dtype), eps)

    def transform(self, x: Tensor) -> Tensor:
        """Whitens x [N,C,H,W] (the fitted C·H·W); returns the same shape."""
        flat = x.reshape(x.shape[0], -1)
        whitened = (flat - self.mean.to(flat)) @ self.transform_matrix.to(flat)
        return whitened.view(x.shape)

    def inverse(self, x: Tensor) -> Tensor:
        """Maps whitened x [N,C,H,W] back to image space; returns the same shape."""
        flat = x.reshape(x.shape[0], -1)
        return (flat @ self.inverse_matrix.to(flat) + self.mean.to(flat)).view(x.shape)

    def to(self, device: torch.device | str) -> ZCA:
        """A copy with its tensors on ``device`` (avoids a [D,D] copy on every call)."""
        return ZCA(self.mean.to(device), self.transform_matrix.to(device), self.inverse_matrix.to(device), self.eps)

    def state_dict(self) -> dict[str, Tensor | float]:
        """Tensors and floats only, so it saves with ``torch.save(..., weights_only=True)``."""
        return {"mean": self.mean, "transform": self.transform_matrix, "inverse": self.inverse_matrix, "eps": self.eps}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor | float]) -> ZCA:
        """Rebuilds a :class:`ZCA` from :meth:`state_dict`'s output."""
        return cls(state["mean"], state["transform"], state["inverse"], float(state["eps"]))
