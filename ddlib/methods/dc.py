"""DC and DSA: gradient matching (Zhao et al., ICLR 2021; Zhao & Bilen, ICML 2021; algorithms.md 2-3).

Each iteration draws a fresh network. For each of ``outer`` steps, the per-class gradients of the
cross-entropy on a real batch and on the synthetic images of that class are compared with a distance
(DC's layer-wise, per-output-row cosine by default), the images take one SGD step on that distance,
and then (except after the last outer step) the network trains for ``inner`` epochs on the current
synthetic set. DSA adds the same (siamese) augmentation to both batches inside the matching and
ordinary augmentation in the inner training.

Per-class gradients come from ``torch.func``: ``vmap(grad(loss))`` over the class axis computes all
K classes' gradients in one batched pass (``class_grads="batched"``, the default on a GPU); ``"loop"``
runs plain autograd one class at a time in cache-sized chunks, which is about twice as fast on a CPU
(measured: 8.2 s vs 19-38 s for the 10 x 256 real MNIST images of one ConvNet-3 outer step).

The optional higher-order term (``hessian_weight > 0``) adds the distance between Hessian-vector
products of the real and synthetic losses, ``H v`` along Rademacher directions ``v`` of the parameters,
computed forward-over-reverse (``jvp`` of ``grad``). Each probe costs about two more gradient passes
over the real batch and a third-order pass through the synthetic images (about 3-4x a DC outer step).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

from ddlib.evaluate import Protocol, train_network
from ddlib.methods.base import DistillConfig, Distiller
from ddlib.methods.registry import register_method
from ddlib.models import get_network, has_batchnorm, init_parameters_

__all__ = ["DCConfig", "DSAConfig", "DC", "DSAMethod", "loops_for", "class_gradients", "gradient_distance",
           "class_hvps", "DISTANCES"]

DISTANCES = ("layerwise", "mse", "cos")

# DC's (outer, inner) table (utils.get_loops); other IPCs follow loops_for's rule.
LOOP_TABLE = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}


@dataclass
class DCConfig(DistillConfig):
    """DC's settings; defaults are the official code's (main.py --method DC)."""

    iterations: int = 1000           # outer iterations, each with a fresh network
    lr_img: float = 0.1              # SGD lr of the images (the README: 0.01 for MLP)
    batch_real: int = 256            # real images per class per outer step
    init: str = "noise"              # the official DC default
    dsa: bool = False                # DC matches plain images; the dsa method turns this on
    lr_net: float = 0.01             # SGD lr (no momentum) of the inner training on the synthetic set
    batch_train: int = 256           # batch of the inner training
    outer_loop: int = 0              # outer steps per iteration (0: the IPC table, see loops_for)
    inner_loop: int = 0              # inner epochs after each outer step but the last (0: the IPC table)
    distance: str = "layerwise"      # layerwise (DC's per-row cosine, 1-D tensors ignored) | mse | cos
    bn_real: int = 16                # real images per class that set BatchNorm statistics before matching
    hessian_weight: float = 0.0      # weight of the Hessian-vector-product distance (0: plain DC)
    hessian_probes: int = 1          # Rademacher directions per outer step for that term
    class_grads: str = "auto"        # batched (torch.func.vmap over classes) | loop (plain autograd, one class
                                     # at a time) | auto: batched on a GPU, loop on a CPU (2x faster there)


@dataclass
class DSAConfig(DCConfig):
    """DSA = DC with siamese augmentation in the matching (the README's command: real init)."""

    dsa: bool = True
    init: str = "real"


def loops_for(images_per_class: int) -> tuple[int, int]:
    """DC's (outer, inner) for an IPC: the table's row where it has one; otherwise outer = IPC (at most
    50) and inner interpolated linearly between the table's rows (50 below IPC 10, 10 above IPC 50)."""
    if images_per_class in LOOP_TABLE:
        return LOOP_TABLE[images_per_class]
    if images_per_class < 1:
        raise ValueError(f"images per class must be >= 1, got {images_per_class}")
    outer = min(images_per_class, 50)
    rows = sorted((ipc, inner) for ipc, (_, inner) in LOOP_TABLE.items() if ipc >= 10)
    if images_per_class <= rows[0][0]:
        return outer, rows[0][1]
    if images_per_class >= rows[-1][0]:
        return outer, rows[-1][1]
    for (lo, inner_lo), (hi, inner_hi) in zip(rows, rows[1:]):
        if lo <= images_per_class <= hi:
            return outer, round(inner_lo + (inner_hi - inner_lo) * (images_per_class - lo) / (hi - lo))
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------------- per-class grads
def _class_loss(net: nn.Module, buffers: dict[str, Tensor]) -> Callable[..., Tensor]:
    """``loss(params, x [n, C, H, W], y [n]) -> mean cross-entropy`` of ``net`` run functionally."""
    def loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(net, (params, buffers), (x,)), y)
    return loss


def _per_class(fn: Callable, x: Tensor, y: Tensor, batched: bool):
    """``fn(x_c, y_c)`` for every class of x [K, n, ...], stacked on a new leading axis."""
    if batched:
        return vmap(fn)(x, y)
    outs = [fn(xc, yc) for xc, yc in zip(x, y)]
    return torch.utils._pytree.tree_map(lambda *ts: torch.stack(ts), *outs)


def class_gradients(net: nn.Module, x: Tensor, y: Tensor, *, batched: bool = True,
                    chunk: int = 0) -> dict[str, Tensor]:
    """Gradients of each class's mean cross-entropy w.r.t. ``net``'s parameters.

    x: [K, n, C, H, W], y: [K, n] -> {name: [K, *param.shape]}. Differentiable w.r.t. x when x requires
    grad (the synthetic side); with ``chunk`` the n images of each class go through in slices of at
    most ``chunk`` and their gradients are averaged (equal to one pass; cache-friendly on a CPU).
    """
    if not batched:
        return _looped_gradients(net, x, y, chunk)
    params = {k: v.detach() for k, v in net.named_parameters()}
    loss = _class_loss(net, dict(net.named_buffers()))
    fn = lambda xc, yc: grad(loss)(params, xc, yc)  # noqa: E731
    n = x.shape[1]
    if not chunk or chunk >= n:
        return _per_class(fn, x, y, batched=True)
    total: dict[str, Tensor] = {}
    for xs, ys in zip(x.split(chunk, dim=1), y.split(chunk, dim=1)):
        part = _per_class(fn, xs, ys, batched=True)
        for k, g in part.items():
            total[k] = total[k] + g * (xs.shape[1] / n) if k in total else g * (xs.shape[1] / n)
    return total


def _looped_gradients(net: nn.Module, x: Tensor, y: Tensor, chunk: int) -> dict[str, Tensor]:
    """``class_gradients`` by plain autograd, one class (and ``chunk`` images) at a time."""
    return _looped_per_class(net, x, y, chunk,
                             lambda loss, params, keep: torch.autograd.grad(loss, params, create_graph=keep))


def _looped_per_class(net: nn.Module, x: Tensor, y: Tensor, chunk: int,
                      derivative: Callable[[Tensor, list, bool], Sequence[Tensor]]) -> dict[str, Tensor]:
    """``derivative(loss, params, keep_graph)`` (one tensor per parameter, linear in the loss) of each
    class's mean cross-entropy, x [K, n, ...] -> {name: [K, *param.shape]}, summed over slices of at most
    ``chunk`` images; keeps the graph to x when x requires grad."""
    names = [name for name, _ in net.named_parameters()]
    params = [p.requires_grad_() for p in net.parameters()]
    n, create_graph = x.shape[1], x.requires_grad
    per_class = []
    with torch.enable_grad():
        for xc, yc in zip(x, y):
            total = None
            for xs, ys in zip(xc.split(chunk or n), yc.split(chunk or n)):
                loss = F.cross_entropy(net(xs), ys, reduction="sum") / n
                d = derivative(loss, params, create_graph)
                total = list(d) if total is None else [a + b for a, b in zip(total, d)]
            per_class.append(total if create_graph else [t.detach() for t in total])
    return {name: torch.stack([d[i] for d in per_class]) for i, name in enumerate(names)}


def class_hvps(net: nn.Module, x: Tensor, y: Tensor, directions: dict[str, Tensor], *,
               batched: bool = True, chunk: int = 0) -> dict[str, Tensor]:
    """Hessian-vector products ``H_c v`` of each class's mean cross-entropy along ``directions`` (one v
    shared by the classes): x [K, n, ...] -> {name: [K, *param.shape]}. Differentiable w.r.t. x when x
    requires grad. ``batched``: forward-over-reverse (``jvp`` of ``grad``) under ``vmap``; otherwise
    reverse-over-reverse by plain autograd one class (and ``chunk`` images) at a time, about 2x faster on
    a CPU (forward-mode AD through the convolutions' backward is slow there; measured: 120.7 s -> 55.7 s
    for the 10 x 256 real MNIST images of one ConvNet-3 outer step, one thread)."""
    if not batched:
        return _looped_hvps(net, x, y, directions, chunk)
    params = {k: v.detach() for k, v in net.named_parameters()}
    loss = _class_loss(net, dict(net.named_buffers()))

    def hvp(xc: Tensor, yc: Tensor) -> dict[str, Tensor]:
        return jvp(lambda p: grad(loss)(p, xc, yc), (params,), (directions,))[1]

    with warnings.catch_warnings():  # forward-mode AD scripts torch's own decompositions on first use
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
        return _per_class(hvp, x, y, batched)


def _looped_hvps(net: nn.Module, x: Tensor, y: Tensor, directions: dict[str, Tensor],
                 chunk: int) -> dict[str, Tensor]:
    """``class_hvps`` by double backpropagation, one class (and ``chunk`` images) at a time."""
    v = [directions[name] for name, _ in net.named_parameters()]

    def hvp(loss: Tensor, params: list, keep: bool) -> Sequence[Tensor]:
        g = torch.autograd.grad(loss, params, create_graph=True)
        return torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, v)), params, create_graph=keep)

    return _looped_per_class(net, x, y, chunk, hvp)


# ---------------------------------------------------------------------------------------- distances
def gradient_distance(syn: dict[str, Tensor], real: dict[str, Tensor], kind: str = "layerwise") -> Tensor:
    """Distance between per-class gradients {name: [K, *shape]}, summed over classes.

    layerwise (DC's 'ours'): every tensor with >= 2 dims reshaped to [out, rest] (conv [o, i, h, w] ->
    [o, i*h*w]), ``sum_rows 1 - <a, b> / (|a| |b| + 1e-6)``; 1-D tensors (biases, norm weights) add 0.
    mse: squared error over all parameters; cos: 1 - cosine of the concatenated gradient vectors.
    """
    if kind == "layerwise":
        total = next(iter(syn.values())).new_zeros(())
        for name, a in syn.items():
            if a.dim() <= 2:  # [K, out]: a 1-D parameter
                continue
            a, b = a.flatten(2), real[name].flatten(2)  # [K, out, rest]
            dot = (a * b).sum(-1)
            total = total + (1 - dot / (a.norm(dim=-1) * b.norm(dim=-1) + 1e-6)).sum()
        return total
    a = torch.cat([g.flatten(1) for g in syn.values()], dim=1)  # [K, P]
    b = torch.cat([real[name].flatten(1) for name in syn], dim=1)
    if kind == "mse":
        return (a - b).pow(2).sum()
    if kind == "cos":
        return (1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + 1e-6)).sum()
    raise ValueError(f"unknown distance {kind!r}; choose one of {', '.join(DISTANCES)}")


# ------------------------------------------------------------------------------------------- method
def rademacher_like(params: dict[str, Tensor], rng: torch.Generator) -> dict[str, Tensor]:
    """Random +-1 directions with the parameters' shapes (drawn on the CPU from ``rng``)."""
    return {k: (torch.randint(0, 2, p.shape, generator=rng) * 2 - 1).to(p) for k, p in params.items()}


@register_method("dc")
class DC(Distiller):
    name = "dc"
    Config = DCConfig
    shardable = True  # the matching is per class; BatchNorm is frozen (eval mode) before it
    PRESETS: ClassVar[dict[str, dict]] = {
        # The course's Table 1 for MNIST (K = 100 networks, T = 10 outer steps, zeta_theta = 50 inner
        # epochs, eta_S = 0.1, eta_theta = 0.01, minibatch 256); MHIST: --iterations 200 --batch-real 128.
        "course": dict(iterations=100, outer_loop=10, inner_loop=50, lr_img=0.1, lr_net=0.01, batch_real=256,
                       ipc=10),
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg, real = self.cfg, self.real
        if cfg.distance not in DISTANCES:
            raise ValueError(f"unknown distance {cfg.distance!r}; choose one of {', '.join(DISTANCES)}")
        if cfg.class_grads not in ("auto", "batched", "loop"):
            raise ValueError(f"class_grads must be 'auto', 'batched' or 'loop', got {cfg.class_grads!r}")
        self.batched = cfg.class_grads == "batched" or (cfg.class_grads == "auto" and self.device.type == "cuda")
        table_outer, table_inner = loops_for(cfg.ipc)
        self.outer, self.inner = cfg.outer_loop or table_outer, cfg.inner_loop or table_inner
        self.net = get_network(cfg.model, real.channels, real.num_classes, real.image_size, device=self.device)
        self.inner_protocol = Protocol(name="dc-inner", epochs=self.inner, lr=cfg.lr_net, momentum=0.0,
                                       weight_decay=0.0, batch_size=cfg.batch_train, schedule="constant",
                                       augment="dsa" if cfg.dsa else "none", extra_epoch=False)
        self.real_labels = torch.arange(real.num_classes, device=self.device)[:, None].expand(-1, cfg.batch_real)
        self.syn_labels = self.per_class(self.labels)

    def freeze_batchnorm(self, iteration: int, outer: int) -> None:
        """BatchNorm nets: statistics from ``bn_real`` real images per class in train mode, then frozen
        (eval mode) for the matching, as DC does; other nets are left alone."""
        net = self.net
        if not has_batchnorm(net):
            return
        x = self.real.sample_per_class(self.cfg.bn_real, self.rng("bn", iteration, outer)).flatten(0, 1)
        net.train()
        with torch.no_grad():
            net(x)
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()

    def matching_loss(self, real_x: Tensor, syn_x: Tensor, rng: torch.Generator) -> dict[str, Tensor]:
        """Gradient distance (plus the weighted HVP distance) for real [k, n, ...] and synthetic [k, ipc, ...]
        images of the ``owned`` classes (all K in one process)."""
        cfg, net, batched = self.cfg, self.net, self.batched
        real_y = self.real_labels[self.owned, :real_x.shape[1]]  # sample_per_class gives fewer for a small class
        syn_y = self.syn_labels[self.owned]
        with torch.no_grad():
            g_real = class_gradients(net, real_x, real_y, batched=batched, chunk=self._real_chunk(real_x))
        g_syn = class_gradients(net, syn_x, syn_y, batched=batched)
        loss = gradient_distance(g_syn, g_real, cfg.distance)
        out = {"grad_distance": loss.detach()}
        if cfg.hessian_weight > 0:
            params = {k: v.detach() for k, v in net.named_parameters()}
            hess = loss.new_zeros(())
            for _ in range(cfg.hessian_probes):
                v = rademacher_like(params, rng)
                with torch.no_grad():
                    h_real = class_hvps(net, real_x, real_y, v, batched=batched, chunk=self._real_chunk(real_x))
                hess = hess + gradient_distance(class_hvps(net, syn_x, syn_y, v, batched=batched),
                                                h_real, cfg.distance)
            hess = hess / cfg.hessian_probes
            loss = loss + cfg.hessian_weight * hess
            out["hvp_distance"] = hess.detach()
        out["loss"] = loss
        return out

    def _real_chunk(self, real_x: Tensor) -> int:
        """Real images per class per pass: everything on a GPU, ~``chunk_size`` images per pass on a CPU
        (vmap passes all K classes at once, so each class gets its share of that)."""
        images = self.chunk_size(self.num_classes * real_x.shape[1])
        return max(1, images // self.num_classes) if self.batched else images

    def step(self, iteration: int) -> dict[str, Tensor]:
        init_parameters_(self.net, self.rng("net", iteration))
        self.net.requires_grad_(True)
        totals: dict[str, Tensor] = {}
        for outer in range(self.outer):
            for key, value in self.outer_step(iteration, outer).items():
                totals[key] = totals.get(key, 0) + value / self.outer
        return totals

    def outer_step(self, iteration: int, outer: int) -> dict[str, Tensor]:
        """One matching update of the images, then (except after the last outer step) ``inner`` epochs of
        training of the network on the current synthetic set. Returns the detached loss parts.

        Under class sharding a rank matches and updates its own classes, and the full set is gathered
        before each inner training (the one exchange DC needs)."""
        cfg, net = self.cfg, self.net
        self.freeze_batchnorm(iteration, outer)
        real_x, syn_x = self.matching_batches(cfg.batch_real, self.rng("real", iteration, outer),
                                              self.rng("dsa", iteration, outer))
        with self.autocast():
            parts = self.matching_loss(real_x, syn_x, self.rng("hvp", iteration, outer))
        self.update_images(parts["loss"])
        if outer < self.outer - 1:
            self.share_images()
            net.train()
            train_network(net, self.images.detach(), self.labels, self.inner_protocol,
                          rng=self.rng("inner", iteration, outer), dsa_strategy=self._dsa_strategy(),
                          precision=cfg.precision)
        return {key: value.detach() for key, value in parts.items()}

    def _dsa_strategy(self) -> str:
        return self.dsa.strategy if self.dsa is not None else ""


@register_method("dsa")
class DSAMethod(DC):
    """DC with differentiable siamese augmentation (``--method dsa``)."""

    name = "dsa"
    Config = DSAConfig
