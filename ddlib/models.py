"""The model zoo of the dataset-distillation literature (DC/DSA/DM/MTT ``networks.py``), made reproducible.

``get_network(name, channels, num_classes, image_size, seed=...)`` builds any registered model. Networks
are seeded from the ``seed`` argument (or an explicit ``generator``), never from the clock, and building
one never touches torch's global RNG: the module is created on the meta device, materialised with
``to_empty`` and then initialised by ``init_parameters_`` from a private generator, with PyTorch's own
default init. Same seed, bit-identical parameters.

Every model is a ``DDNet``: ``forward(x) -> logits [B, K]``, ``embed(x) -> [B, embed_dim]`` (the
features the final ``classifier`` reads; DM matches these), and ``block_outputs(x)`` returning the
feature map of every block after its activation and before its pooling, plus the embedding, from one
pass (DataDAM's attention maps). At the reference sizes (1x28x28, 3x32x32) the architectures match the
official code layer by layer; at other sizes flatten heads are sized by a shape pass on meta tensors,
2x2 poolings pass 1-pixel maps through unchanged, and ResNet/VGG pool adaptively to 1x1.
"""
from __future__ import annotations

import difflib
import fnmatch
import math
import re
from collections.abc import Callable, Sequence
from functools import partial
from itertools import chain

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ddlib import rng

__all__ = [
    "MLP", "VGG", "AlexNet", "BasicBlock", "ConvBlock", "ConvNet", "DDNet", "LeNet", "Pool2d", "ResNet",
    "compile_network", "get_network", "has_batchnorm", "init_parameters_", "list_models", "make_norm",
    "register_model",
]

Shape = tuple[int, int, int]  # [C, H, W] of one sample


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------

def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    """``28`` or ``(28, 28)`` -> ``(28, 28)``."""
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def _infer_shape(module: nn.Module, in_shape: Sequence[int]) -> Shape:
    """Output shape [C', H', W'] of ``module`` on one [C, H, W] input, run on meta tensors (no FLOPs)."""
    meta_state = {name: t.to("meta") for name, t in chain(module.named_parameters(), module.named_buffers())}
    # A batch of 2 because BatchNorm in training mode refuses one value per channel.
    x = torch.empty(2, *in_shape, device="meta")
    with torch.no_grad():
        return tuple(functional_call(module, meta_state, (x,)).shape[1:])


def _canonical(value: str, suffix: str) -> str:
    """Accept the reference spellings too: 'instancenorm' -> 'instance', 'avgpooling' -> 'avg'."""
    return value.lower().removesuffix(suffix)


def make_norm(kind: str, shape: Shape) -> nn.Module:
    """Normalisation for a [C, H, W] map: 'instance' | 'batch' | 'layer' | 'group' | 'none'.

    'instance' is ``GroupNorm(C, C)`` as in the reference (learnable affine, unlike ``InstanceNorm2d``);
    'layer' normalises over the whole current [C, H, W] map.
    """
    channels = shape[0]
    builders: dict[str, Callable[[], nn.Module]] = {
        "instance": lambda: nn.GroupNorm(channels, channels, affine=True),
        "batch": lambda: nn.BatchNorm2d(channels),
        "layer": lambda: nn.LayerNorm(list(shape)),
        "group": lambda: nn.GroupNorm(4, channels, affine=True),
        "none": nn.Identity,
    }
    kind = _canonical(kind, "norm")
    if kind not in builders:
        raise ValueError(f"unknown norm {kind!r}; expected one of {sorted(builders)}")
    return builders[kind]()


def make_activation(kind: str) -> nn.Module:
    """'relu' | 'sigmoid' | 'leakyrelu' | 'swish'; never in place, so torch.func can differentiate twice."""
    builders: dict[str, Callable[[], nn.Module]] = {
        "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "leakyrelu": partial(nn.LeakyReLU, 0.01), "swish": nn.SiLU,
    }
    if kind.lower() not in builders:
        raise ValueError(f"unknown activation {kind!r}; expected one of {sorted(builders)}")
    return builders[kind.lower()]()


class Pool2d(nn.Module):
    """2x2/2 'avg' or 'max' pooling [B, C, H, W] -> [B, C, H//2, W//2].

    A map already 1 px high or wide passes through unchanged, so deep nets still run on small inputs.
    """

    def __init__(self, kind: str) -> None:
        super().__init__()
        kind = _canonical(kind, "pooling")
        if kind not in ("avg", "max"):
            raise ValueError(f"unknown pooling {kind!r}; expected 'avg' or 'max'")
        self.kind = kind

    def forward(self, x: Tensor) -> Tensor:
        if min(x.shape[-2:]) < 2:
            return x
        if self.kind == "max" and torch.is_grad_enabled():
            return F.max_pool2d(x, 2, 2)  # its backward beats the slices' (the forward does not)
        if x.shape[-2] % 2 or x.shape[-1] % 2:  # odd edges dropped, as the torch poolings do
            x = x[..., : x.shape[-2] // 2 * 2, : x.shape[-1] // 2 * 2]
        return _pool_2x2(x, torch.maximum, 1.0) if self.kind == "max" else _AvgPool2x2.apply(x)

    def extra_repr(self) -> str:
        return self.kind


def _pool_2x2(x: Tensor, combine: Callable[[Tensor, Tensor], Tensor], scale: float) -> Tensor:
    """2x2/2 pooling of an even-sized map from strided slices: same values as ``F.avg_pool2d``/``F.max_pool2d``
    but 4-10x faster on NCHW maps on a CPU, where the pooling kernels are not vectorised."""
    rows = combine(x[..., 0::2, :], x[..., 1::2, :])
    out = combine(rows[..., 0::2], rows[..., 1::2])
    return out * scale if scale != 1.0 else out


class _AvgPool2x2(torch.autograd.Function):
    """2x2/2 average pooling of an even-sized map whose backward copies each output gradient / 4 to its 2x2 block.

    Autograd through the slices of ``_pool_2x2`` zero-fills and scatters a full-size gradient per slice,
    twice the cost of the forward. Linear, so its backward (the copy) and jvp (the pooling of the tangent)
    are plain differentiable ops: double backward (DC), ``vmap`` and forward-mode AD (DC's batched HVPs)
    work through it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return _pool_2x2(x, torch.add, 0.25)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return (grad * 0.25).repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)

    @staticmethod
    def jvp(ctx, tangent: Tensor) -> Tensor:
        return _pool_2x2(tangent, torch.add, 0.25)


def make_pool(kind: str) -> nn.Module:
    """``Pool2d(kind)``, or ``nn.Identity`` for 'none'."""
    return nn.Identity() if _canonical(kind, "pooling") == "none" else Pool2d(kind)


class ConvBlock(nn.Module):
    """conv -> norm -> act -> pool. ``activate`` stops before the pooling (the map DataDAM attends to)."""

    def __init__(self, conv: nn.Conv2d, norm: nn.Module, act: nn.Module, pool: nn.Module) -> None:
        super().__init__()
        self.conv, self.norm, self.act, self.pool = conv, norm, act, pool

    def activate(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, C', H', W'] before pooling."""
        return self.act(self.norm(self.conv(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.activate(x))


def _run_blocks(blocks: nn.Sequential, x: Tensor, taps: list[Tensor] | None) -> Tensor:
    """Apply ConvBlocks in turn, appending each pre-pooling map to ``taps`` when given."""
    for block in blocks:
        x = block.activate(x)
        if taps is not None:
            taps.append(x)
        x = block.pool(x)
    return x


def _mnist_padding(channels: int, image_size: int | Sequence[int]) -> bool:
    """The reference pads the first conv of 1-channel nets so 28-px MNIST behaves like a 32-px image.

    All of the reference's 1-channel data is 28 px; other 1-channel sizes (e.g. 16-px digits) get the
    ordinary padding, like 3-channel inputs, instead of maps 6 px larger than the image.
    """
    return channels == 1 and _pair(image_size)[0] == 28


def _fit_padding(size: int, kernel: int, padding: int) -> int:
    """``padding``, or 'same' padding when an unpadded conv would leave an empty map (tiny inputs)."""
    return padding if size + 2 * padding - kernel + 1 >= 1 else kernel // 2


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------

def has_batchnorm(net: nn.Module) -> bool:
    """Whether ``net`` normalises with batch statistics (its outputs then depend on the whole batch)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def compile_network(net: DDNet, **options) -> DDNet:
    """Compile ``net``'s ``embed`` and ``block_outputs`` (and so ``forward``) with ``torch.compile``, in place.

    Meant for a network that is re-initialised in place (DM, DataDAM): the compiled code is then reused every
    iteration, and only a new input shape (a smaller last chunk) or grad mode compiles again. ``options`` go to
    ``torch.compile``. Double backward through the compiled code is not supported.
    """
    net.embed = torch.compile(net.embed, **options)
    net.block_outputs = torch.compile(net.block_outputs, **options)
    return net


class DDNet(nn.Module):
    """Base class: ``forward(x) = classifier(embed(x))``; subclasses implement ``_embed(x, taps)``."""

    embed_dim: int
    classifier: nn.Linear

    def _embed(self, x: Tensor, taps: list[Tensor] | None) -> Tensor:
        """[B, C, H, W] -> [B, embed_dim]; appends every block's output to ``taps`` when given."""
        raise NotImplementedError

    def embed(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, embed_dim]: the features the classifier reads."""
        return self._embed(x, None)

    def block_outputs(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """One pass: ([per-block map after activation, before pooling], embedding [B, embed_dim])."""
        taps: list[Tensor] = []
        embedding = self._embed(x, taps)
        return taps, embedding

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> logits [B, K]."""
        return self.classifier(self.embed(x))

    def _stack_blocks(self, shape: Shape, layers: Sequence[tuple], norm: str) -> Shape:
        """Set ``self.blocks`` from (out_channels, kernel, padding, activation, pool) specs; returns the
        [C, H, W] shape the last block outputs for one [C, H, W] = ``shape`` input."""
        blocks = []
        for out_channels, kernel, padding, act, pool in layers:
            conv = nn.Conv2d(shape[0], out_channels, kernel, padding=padding)
            block = ConvBlock(conv, make_norm(norm, _infer_shape(conv, shape)), act, pool)
            shape = _infer_shape(block, shape)
            blocks.append(block)
        self.blocks = nn.Sequential(*blocks)
        return shape

    def _flatten_head(self, shape: Shape, num_classes: int) -> None:
        """A linear classifier over the flattened [C, H, W] features."""
        self.embed_dim = math.prod(shape)
        self.classifier = nn.Linear(self.embed_dim, num_classes)

    @property
    def has_batchnorm(self) -> bool:
        return has_batchnorm(self)


class ConvNet(DDNet):
    """The DC/DM/MTT ConvNet: ``depth`` x [conv3x3 -> norm -> act -> pool 2x2], then one linear layer.

    With one 28-px input channel the first conv pads 3 (the reference's 28 -> 32 MNIST trick). The parameter
    order is conv0.w, conv0.b, norm0.w, norm0.b, conv1.w, ..., classifier.w, classifier.b.
    """

    def __init__(self, channels: int, num_classes: int, image_size: int | Sequence[int], width: int = 128,
                 depth: int = 3, act: str = "relu", norm: str = "instance", pool: str = "avg") -> None:
        super().__init__()
        first_padding = 3 if _mnist_padding(channels, image_size) else 1
        layers = [(width, 3, first_padding if level == 0 else 1, make_activation(act), make_pool(pool))
                  for level in range(depth)]
        shape = self._stack_blocks((channels, *_pair(image_size)), layers, norm)
        self._flatten_head(shape, num_classes)

    def _embed(self, x: Tensor, taps: list[Tensor] | None) -> Tensor:
        return _run_blocks(self.blocks, x, taps).flatten(1)


class MLP(DDNet):
    """flatten -> Linear(C*H*W, 128) -> ReLU -> Linear(128, 128) -> ReLU -> Linear(128, K)."""

    def __init__(self, channels: int, num_classes: int, image_size: int | Sequence[int],
                 hidden: int = 128) -> None:
        super().__init__()
        self.hidden = nn.Sequential(
            nn.Sequential(nn.Linear(channels * math.prod(_pair(image_size)), hidden), nn.ReLU()),
            nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU()),
        )
        self.embed_dim = hidden
        self.classifier = nn.Linear(hidden, num_classes)

    def _embed(self, x: Tensor, taps: list[Tensor] | None) -> Tensor:
        x = x.flatten(1)
        for layer in self.hidden:
            x = layer(x)
            if taps is not None:
                taps.append(x)
        return x


class LeNet(DDNet):
    """conv5(6)-ReLU-maxpool -> conv5(16)-ReLU-maxpool -> FC 120 -> ReLU -> 84 -> ReLU -> K.

    The first conv pads 2 for one-channel 28-px input (as the reference); a conv that would leave an empty map
    on a tiny input pads 'same' instead. The embedding is the 84-d input of the classifier.
    """

    def __init__(self, channels: int, num_classes: int, image_size: int | Sequence[int]) -> None:
        super().__init__()
        shape: Shape = (channels, *_pair(image_size))
        blocks = []
        for out_channels, padding in ((6, 2 if _mnist_padding(channels, image_size) else 0), (16, 0)):
            padding = _fit_padding(min(shape[1:]), 5, padding)
            block = ConvBlock(nn.Conv2d(shape[0], out_channels, 5, padding=padding), nn.Identity(),
                              nn.ReLU(), Pool2d("max"))
            shape = _infer_shape(block, shape)
            blocks.append(block)
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Linear(math.prod(shape), 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU())
        self.embed_dim = 84
        self.classifier = nn.Linear(84, num_classes)

    def _embed(self, x: Tensor, taps: list[Tensor] | None) -> Tensor:
        return self.head(_run_blocks(self.blocks, x, taps).flatten(1))


class AlexNet(DDNet):
    """The 32-px AlexNet of DC/MTT: five convs (128, 192, 256, 192, 192), max-pools after 1, 2 and 5.

    ``norm='batch'`` gives AlexNetBN (BatchNorm after every conv). The head is one linear layer on the
    flattened map (192*4*4 at the reference sizes).
    """

    # (out_channels, kernel, padding, pooled)
    LAYERS = ((128, 5, 2, True), (192, 5, 2, True), (256, 3, 1, False), (192, 3, 1, False), (192, 3, 1, True))

    def __init__(self, channels: int, num_classes: int, image_size: int | Sequence[int],
                 norm: str = "none") -> None:
        super().__init__()
        layers = []
        for index, (out_channels, kernel, padding, pooled) in enumerate(self.LAYERS):
            # The reference pads 4 on a one-channel first conv: 28 px in -> 32 px out (MNIST only).
            padding = 4 if index == 0 and _mnist_padding(channels, image_size) else padding
            layers.append((out_channels, kernel, padding, nn.ReLU(), Pool2d("max") if pooled else nn.Identity()))
        shape = self._stack_blocks((channels, *_pair(image_size)), layers, norm)
        self._flatten_head(shape, num_classes)

    def _embed(self, x: Tensor, taps: list[Tensor] | None) -> Tensor:
        return _run_blocks(self.blocks, x, taps).flatten(1)


VGG_CONFIGS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


class VGG(DDNet):
    """VGG: conv3x3 -> norm -> ReLU per config entry, 'M' = max-pool 2x2; global average pool -> Linear.

    The reference ends with a 1x1 map at 32 px, where the adaptive pool is the identity.
    """

    def __init__(self, channels: int, num_classes: int, image_size: int | Sequence[int],
                 config: str = "vgg11", norm: str = "instance") -> None:
        super().__init__()
        layers = VGG_CONFIGS[config.lower()]
        shape: Shape = (channels, *_pair(image_size))
        blocks = []
        for index, out_channels in enumerate(layers):
            if out_channels == "M":
                continue
            padding = 3 if index == 0 and _mnist_padding(channels, image_size) else 1
            conv = nn.Conv2d(shape[0], out_channels, 3, padding=padding)
            pooled = index + 1 < len(layers) and layers[index + 1] == "M"
            block = ConvBlock(conv, make_norm(norm, _infer_shape(conv, shape)), nn.ReLU(),
                              Pool2d("max") if pooled else nn.Identity())
            shape = _infer_shape(block, shape)
            blocks.append(block)
        self.blocks = nn.Sequential(*blocks)
        self.embed_dim = shape[0]
        self.classifier = nn.Linear(self.embed_dim, num_classes)

    def _embed(self, x: Tensor, taps: list[Tensor] | None) -> Tensor:
        return F.adaptive_avg_pool2d(_run_blocks(self.blocks, x, taps), 1).flatten(1)


class BasicBlock(nn.Module):
    """ResNet basic block [B, C, H, W] -> [B, planes, H/s, W/s]: two conv3x3+norm, identity/1x1 shortcut.

    ``avg_pool_downsample`` (the reference's *_AP nets) replaces the stride-2 convs by stride-1 convs
    followed by 2x2 average pooling, on both paths.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str,
                 avg_pool_downsample: bool = False) -> None:
        super().__init__()
        conv_stride = 1 if avg_pool_downsample else stride
        downsample = Pool2d("avg") if avg_pool_downsample and stride != 1 else nn.Identity()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=conv_stride, padding=1, bias=False)
        self.norm1 = make_norm(norm, (planes, 1, 1))
        self.downsample = downsample
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.norm2 = make_norm(norm, (planes, 1, 1))
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=conv_stride, bias=False),
                *([Pool2d("avg")] if avg_pool_downsample else []),
                make_norm(norm, (planes, 1, 1)),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.downsample(F.relu(self.norm1(self.conv1(x))))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(DDNet):
    """ResNet-18 style: conv3x3(64)+norm+ReLU stem, four stages of basic blocks (64/128/256/512).

    Default head: global average pool -> Linear(512, K) (the reference's avg_pool2d(4) at 32 px).
    ``avg_pool_downsample=True`` gives ResNet18_AP: flatten -> Linear(512*h*w, K), as in the reference.
    'layer' norm is not supported here (block shapes depend on the input size).
    """

    def __init__(self, channels: int, num_classes: int, image_size: int | Sequence[int],
                 blocks_per_stage: Sequence[int] = (2, 2, 2, 2), norm: str = "instance",
                 avg_pool_downsample: bool = False) -> None:
        super().__init__()
        if _canonical(norm, "norm") == "layer":
            raise ValueError("ResNet supports 'instance', 'batch', 'group' or 'none' norm")
        self.stem = nn.Sequential(nn.Conv2d(channels, 64, 3, padding=1, bias=False),
                                  make_norm(norm, (64, 1, 1)), nn.ReLU())
        stages, in_planes = [], 64
        for index, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks_per_stage)):
            strides = [1 if index == 0 else 2] + [1] * (count - 1)
            stages.append(nn.Sequential(*(BasicBlock(in_planes if i == 0 else planes, planes, s, norm,
                                                     avg_pool_downsample) for i, s in enumerate(strides))))
            in_planes = planes
        self.stages = nn.Sequential(*stages)
        self.global_pool = not avg_pool_downsample
        if self.global_pool:
            self.embed_dim = in_planes
        else:
            features = nn.Sequential(self.stem, self.stages)
            self.embed_dim = math.prod(_infer_shape(features, (channels, *_pair(image_size))))
        self.classifier = nn.Linear(self.embed_dim, num_classes)

    def _embed(self, x: Tensor, taps: list[Tensor] | None) -> Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
            if taps is not None:
                taps.append(x)
        return (F.adaptive_avg_pool2d(x, 1) if self.global_pool else x).flatten(1)


# ------------------------------------------------------------------------------------------------
# Initialisation
# ------------------------------------------------------------------------------------------------

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _draw_(tensor: Tensor, generator: torch.Generator, fill: Callable[[Tensor], object]) -> None:
    """Run the in-place random ``fill`` on ``tensor``, drawing on the generator's device when they differ.

    Drawing on the generator's device keeps parameters bit-identical whichever device the net lives on.
    """
    if tensor.device == generator.device:
        fill(tensor)
        return
    draw = torch.empty(tensor.shape, dtype=tensor.dtype, device=generator.device)
    fill(draw)
    tensor.copy_(draw)


def _init_affine_(module: nn.Conv2d | nn.Linear, generator: torch.Generator) -> None:
    """PyTorch's ``reset_parameters`` for conv/linear: W, b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    _draw_(module.weight, generator, lambda w: nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator))
    if module.bias is not None:
        fan_in = module.weight[0].numel()  # in_channels/groups * kernel area, as torch computes it
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        _draw_(module.bias, generator, lambda b: nn.init.uniform_(b, -bound, bound, generator=generator))


@torch.no_grad()
def init_parameters_(net: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give ``net`` PyTorch's default initialisation, every random draw taken from ``generator``.

    Conv/Linear: kaiming_uniform(a=sqrt 5) weights and U(+-1/sqrt(fan_in)) biases, module by module in
    ``modules()`` order; norms: weight 1, bias 0, running stats reset. A module type with parameters or
    buffers it does not know raises, so nothing is left holding ``to_empty``'s uninitialised memory.
    """
    for module in net.modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            _init_affine_(module, generator)
        elif isinstance(module, _NORM_TYPES):
            module.reset_parameters()  # deterministic: ones, zeros and fresh running statistics
        elif any(True for _ in chain(module.parameters(recurse=False), module.buffers(recurse=False))):
            raise TypeError(f"init_parameters_ does not know how to initialise {type(module).__name__}")
    return net


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------

ModelFactory = Callable[..., DDNet]  # (channels, num_classes, image_size, **fields) -> DDNet
_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator registering a factory ``(channels, num_classes, image_size, **fields) -> DDNet``.

    Names are case-insensitive; registering a taken name raises.
    """
    key = name.lower()

    def decorate(factory: ModelFactory) -> ModelFactory:
        if key in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[key] = factory
        return factory

    return decorate


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching the fnmatch ``pattern`` (case-insensitive), sorted."""
    return sorted(name for name in _REGISTRY if fnmatch.fnmatchcase(name, pattern.lower()))


# ConvNet variants, named as in the reference code: suffix -> constructor fields.
CONVNET_SUFFIXES: dict[str, dict[str, object]] = {
    **{f"w{width}": {"width": width} for width in (16, 32, 64, 128, 256, 512, 1024)},
    "as": {"act": "sigmoid"}, "ar": {"act": "relu"}, "al": {"act": "leakyrelu"}, "aswish": {"act": "swish"},
    "nn": {"norm": "none"}, "bn": {"norm": "batch"}, "ln": {"norm": "layer"}, "in": {"norm": "instance"},
    "gn": {"norm": "group"},
    "np": {"pool": "none"}, "mp": {"pool": "max"}, "ap": {"pool": "avg"},
    "kip": {"width": 1024, "norm": "none"},  # MTT's ConvNetKIP
}
_SUFFIX_TOKEN = "|".join(sorted(CONVNET_SUFFIXES, key=len, reverse=True))  # longest first: aswish before as
_CONVNET_NAME = re.compile(rf"convnet(?:[-d](?P<depth>\d+))?(?P<suffixes>(?:{_SUFFIX_TOKEN})*)")


def _convnet_fields(name: str) -> dict[str, object] | None:
    """Fields for names like 'convnet-7bn', 'convnetd4', 'convnetaswishbn'; None if not a ConvNet name."""
    match = _CONVNET_NAME.fullmatch(name)
    if match is None:
        return None
    fields: dict[str, object] = {}
    for token in re.findall(_SUFFIX_TOKEN, match["suffixes"]):
        fields.update(CONVNET_SUFFIXES[token])
    if match["depth"]:
        fields["depth"] = int(match["depth"])
    return fields


# The names the course and the papers use; any other 'convnet[-d]N<suffixes>' combination also parses.
_CONVNET_NAMES = (["convnet"] + [f"convnet{sep}{d}" for sep in ("-", "d") for d in range(1, 9)]
                  + [f"convnet{suffix}" for suffix in CONVNET_SUFFIXES] + ["convnetaswishbn"])

_BASE_MODELS: dict[str, ModelFactory] = {
    "mlp": MLP,
    "lenet": LeNet,
    "alexnet": AlexNet,
    "alexnetbn": partial(AlexNet, norm="batch"),
    "vgg11": VGG,
    "vgg11bn": partial(VGG, norm="batch"),
    "resnet18": ResNet,
    "resnet18bn": partial(ResNet, norm="batch"),
    "resnet18_ap": partial(ResNet, avg_pool_downsample=True),
    "resnet18bn_ap": partial(ResNet, norm="batch", avg_pool_downsample=True),
}


def _register_builtin_models() -> None:
    for name in _CONVNET_NAMES:
        register_model(name)(partial(ConvNet, **_convnet_fields(name)))
    for name, factory in _BASE_MODELS.items():
        register_model(name)(factory)


_register_builtin_models()


def _lookup(name: str) -> ModelFactory:
    """The registered factory for ``name``, or a ConvNet parsed from it; raises KeyError otherwise."""
    key = name.lower()
    if key in _REGISTRY:
        return _REGISTRY[key]
    fields = _convnet_fields(key)
    if fields is not None:
        return partial(ConvNet, **fields)
    close = difflib.get_close_matches(key, list(_REGISTRY), n=3)
    raise KeyError(f"unknown model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))


def get_network(name: str, channels: int, num_classes: int, image_size: int | tuple[int, int], *,
                seed: int = 0, generator: torch.Generator | None = None,
                device: str | torch.device = "cpu", **overrides: object) -> DDNet:
    """Build the registered model ``name`` for [channels, *image_size] inputs and ``num_classes`` outputs.

    The network is seeded from ``seed`` (via ``ddlib.rng.generator(seed, "net-init")``) or from an
    explicit ``generator``, never from the clock, and torch's global RNG is left untouched: the module is
    built on the meta device, materialised on ``device`` and initialised by ``init_parameters_``.
    ``overrides`` set constructor fields, e.g. ``get_network("convnet", 1, 10, 28, depth=7, norm="batch")``.
    """
    factory = _lookup(name)
    with torch.device("meta"):
        net = factory(channels, num_classes, _pair(image_size), **overrides)
    net.to_empty(device=device)
    return init_parameters_(net, generator if generator is not None else rng.generator(seed, "net-init"))
