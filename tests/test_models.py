"""Tests for ddlib.models: shapes at every input size, reference parameter counts, seeding, init, torch.func."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from ddlib.models import Pool2d, get_network, init_parameters_, list_models, register_model

BASE_MODELS = ["convnet", "convnet-7", "mlp", "lenet", "alexnet", "alexnetbn", "vgg11", "vgg11bn",
               "resnet18", "resnet18bn"]
SHAPES = [(1, 28), (1, 16), (1, 8), (3, 32), (3, 128)]
GRID = [(name, c, s) for name in BASE_MODELS for c, s in SHAPES] + [("convnet-7", 3, 224), ("resnet18", 3, 224)]
BLOCK_COUNTS = {"convnet": 3, "convnet-7": 7, "mlp": 2, "lenet": 2, "alexnet": 5, "alexnetbn": 5,
                "vgg11": 8, "vgg11bn": 8, "resnet18": 4, "resnet18bn": 4}
NUM_CLASSES = 10


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """One intra-op thread: on a shared 2-core machine, spinning thread pools slow small convs ~50x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _inputs(channels: int, size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(1))


def _state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(("name", "channels", "size"), GRID)
def test_shapes_at_every_input_size(name: str, channels: int, size: int) -> None:
    net = get_network(name, channels, NUM_CLASSES, size)
    x = _inputs(channels, size)
    with torch.inference_mode():
        logits = net(x)
        embedding = net.embed(x)
        blocks, block_embedding = net.block_outputs(x)
        assert torch.equal(net.classifier(embedding), logits)
    assert logits.shape == (2, NUM_CLASSES) and torch.isfinite(logits).all()
    assert embedding.shape == (2, net.embed_dim) and torch.isfinite(embedding).all()
    assert torch.equal(block_embedding, embedding)
    assert len(blocks) == BLOCK_COUNTS[name]
    assert all(b.shape[0] == 2 and torch.isfinite(b).all() for b in blocks)


@pytest.mark.parametrize("name", BASE_MODELS + ["resnet18_ap", "resnet18bn_ap"])
def test_last_block_feeds_embedding(name: str) -> None:
    net = get_network(name, 3, NUM_CLASSES, 16)
    blocks, embedding = net.block_outputs(_inputs(3, 16))
    # Raises if the embedding is not computed from the last block's map in this very pass.
    (sensitivity,) = torch.autograd.grad(embedding.square().sum(), blocks[-1])
    assert sensitivity.abs().sum() > 0


def test_convnet_embedding_is_pooled_last_map() -> None:
    net = get_network("convnet", 3, NUM_CLASSES, 32)
    with torch.no_grad():
        blocks, embedding = net.block_outputs(_inputs(3, 32))
    assert [tuple(b.shape[1:]) for b in blocks] == [(128, 32, 32), (128, 16, 16), (128, 8, 8)]
    torch.testing.assert_close(embedding, F.avg_pool2d(blocks[-1], 2).flatten(1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("channels", "size", "count"), [(1, 28, 317_706), (3, 32, 320_010)])
def test_convnet_parameter_count_matches_reference(channels: int, size: int, count: int) -> None:
    net = get_network("convnet", channels, NUM_CLASSES, size)
    assert sum(p.numel() for p in net.parameters()) == count
    assert net.embed_dim == 2048


def test_convnet_flat_parameter_order() -> None:
    net = get_network("convnet", 3, NUM_CLASSES, 32)
    shapes = [tuple(p.shape) for p in net.parameters()]
    expected = [(128, 3, 3, 3), (128,), (128,), (128,)]
    expected += [(128, 128, 3, 3), (128,), (128,), (128,)] * 2 + [(NUM_CLASSES, 2048), (NUM_CLASSES,)]
    assert shapes == expected
    names = [n for n, _ in net.named_parameters()]
    assert names[:4] == ["blocks.0.conv.weight", "blocks.0.conv.bias", "blocks.0.norm.weight",
                         "blocks.0.norm.bias"]
    assert names[-2:] == ["classifier.weight", "classifier.bias"]


def test_instance_norm_is_groupnorm_per_channel() -> None:
    for name in ("convnet", "vgg11", "resnet18"):
        norms = [m for m in get_network(name, 3, NUM_CLASSES, 32).modules() if isinstance(m, nn.GroupNorm)]
        assert norms and all(m.num_groups == m.num_channels and m.affine for m in norms)


def test_convnet_variants_and_overrides() -> None:
    bn = get_network("ConvNet-7BN", 3, NUM_CLASSES, 128)
    assert len(bn.blocks) == 7 and bn.has_batchnorm
    with torch.no_grad():
        blocks, _ = bn.block_outputs(_inputs(3, 128, batch=2))
    # Seven 2x2 poolings take 128 px to 1 px: the last map is 2x2 before and 1x1 after its pooling.
    assert tuple(blocks[-1].shape[-2:]) == (2, 2) and bn.embed_dim == 128
    assert _state_equal(get_network("convnetd7", 1, NUM_CLASSES, 28), get_network("convnet-7", 1, NUM_CLASSES, 28))
    override = get_network("convnet", 1, NUM_CLASSES, 28, depth=7, norm="batch")
    assert len(override.blocks) == 7 and override.has_batchnorm
    assert not get_network("convnet", 3, NUM_CLASSES, 32).has_batchnorm
    assert get_network("convnetw32", 3, NUM_CLASSES, 32).blocks[0].conv.out_channels == 32
    assert isinstance(get_network("convnetas", 3, NUM_CLASSES, 32).blocks[0].act, nn.Sigmoid)
    assert isinstance(get_network("convnetaswishbn", 3, NUM_CLASSES, 32).blocks[0].act, nn.SiLU)
    assert isinstance(get_network("convnetln", 3, NUM_CLASSES, 32).blocks[1].norm, nn.LayerNorm)
    assert isinstance(get_network("convnetnn", 3, NUM_CLASSES, 32).blocks[0].norm, nn.Identity)
    assert get_network("convnetmp", 3, NUM_CLASSES, 32).blocks[0].pool.kind == "max"
    assert get_network("convnetnp", 3, NUM_CLASSES, 8).embed_dim == 128 * 8 * 8


def test_registry() -> None:
    assert set(BASE_MODELS) <= set(list_models())
    assert {"convnet-1", "convnet-8", "convnetd1", "convnetd8", "convnetw1024", "convnetgn"} <= set(list_models())
    assert list_models("resnet18*") == ["resnet18", "resnet18_ap", "resnet18bn", "resnet18bn_ap"]
    assert list_models("VGG*") == ["vgg11", "vgg11bn"]
    with pytest.raises(KeyError, match="did you mean"):
        get_network("convnett", 3, NUM_CLASSES, 32)
    with pytest.raises(ValueError):
        register_model("ConvNet")(lambda *args, **kwargs: None)


def test_same_seed_identical_different_seed_different() -> None:
    a = get_network("convnet", 3, NUM_CLASSES, 32, seed=3)
    assert _state_equal(a, get_network("convnet", 3, NUM_CLASSES, 32, seed=3))
    b = get_network("convnet", 3, NUM_CLASSES, 32, seed=4)
    assert not torch.equal(a.classifier.weight, b.classifier.weight)
    explicit = get_network("convnet", 3, NUM_CLASSES, 32, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(a.classifier.weight, explicit.classifier.weight)


@pytest.mark.parametrize("name", ["convnet", "convnetbn", "resnet18bn", "vgg11"])
def test_global_rng_untouched(name: str) -> None:
    state = torch.get_rng_state()
    get_network(name, 3, NUM_CLASSES, 32, seed=7)
    assert torch.equal(torch.get_rng_state(), state)


def test_init_matches_pytorch_default() -> None:
    """Same generator state -> the same numbers PyTorch's own reset_parameters draws."""
    with torch.random.fork_rng():
        torch.manual_seed(123)
        reference = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(8, 8), nn.Linear(8, 4))
    with torch.device("meta"):
        ours = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(8, 8), nn.Linear(8, 4))
    init_parameters_(ours.to_empty(device="cpu"), torch.Generator().manual_seed(123))
    assert _state_equal(ours, reference)


def test_init_statistics() -> None:
    net = get_network("convnetbn", 3, NUM_CLASSES, 32)
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            bound = 1 / math.sqrt(module.weight[0].numel())
            assert module.weight.abs().max() <= bound and module.bias.abs().max() <= bound
            assert module.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
        if isinstance(module, nn.BatchNorm2d):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert torch.equal(module.bias, torch.zeros_like(module.bias))
            assert torch.equal(module.running_var, torch.ones_like(module.running_var))
            assert module.num_batches_tracked.item() == 0


def test_init_rejects_unknown_parameterised_modules() -> None:
    with pytest.raises(TypeError):
        init_parameters_(nn.Sequential(nn.Embedding(3, 2)), torch.Generator())


@pytest.mark.parametrize("name", ["convnet", "resnet18bn"])
def test_functional_call_reproduces_forward(name: str) -> None:
    net = get_network(name, 3, NUM_CLASSES, 16).eval()
    x = _inputs(3, 16)
    state = {**dict(net.named_parameters()), **dict(net.named_buffers())}
    with torch.no_grad():
        torch.testing.assert_close(functional_call(net, state, (x,)), net(x), rtol=0, atol=0)


def test_torch_func_double_backward() -> None:
    """No in-place ops: a gradient-of-gradient (DC/MTT style) works through torch.func."""
    net = get_network("convnet", 3, NUM_CLASSES, 8)
    params = {k: v.detach() for k, v in net.named_parameters()}
    x, y = _inputs(3, 8), torch.tensor([0, 1])
    x.requires_grad_(True)

    def loss(p: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(net, p, (images,)), y)

    grads = grad(loss)(params, x)
    grad_norm = sum(g.square().sum() for g in grads.values())
    (image_grad,) = torch.autograd.grad(grad_norm, x)
    assert torch.isfinite(image_grad).all() and image_grad.abs().sum() > 0


def test_pool_passes_one_pixel_maps_through() -> None:
    x = torch.ones(2, 4, 1, 5)
    assert torch.equal(Pool2d("avg")(x), x)
    assert Pool2d("max")(torch.ones(2, 4, 3, 5)).shape == (2, 4, 1, 2)


@pytest.mark.parametrize("height, width", [(8, 8), (9, 7)])
def test_avg_pool_is_avg_pool2d_through_every_transform(height: int, width: int) -> None:
    """The avg pooling's own backward and jvp: values, first and second derivatives, vmap and forward-mode AD
    (DC's double backward and batched HVPs) all equal ``F.avg_pool2d``'s."""
    pool = Pool2d("avg")
    x = torch.randn(2, 3, height, width, dtype=torch.double, requires_grad=True)
    torch.testing.assert_close(pool(x), F.avg_pool2d(x, 2))
    assert torch.autograd.gradcheck(pool, (x,)) and torch.autograd.gradgradcheck(pool, (x,))
    batch, tangent = torch.randn(4, 2, 3, height, width, dtype=torch.double), torch.randn_like(x)
    ours, ref = (lambda x: pool(x).sin().sum()), (lambda x: F.avg_pool2d(x, 2).sin().sum())
    torch.testing.assert_close(vmap(grad(ours))(batch), vmap(grad(ref))(batch))
    torch.testing.assert_close(jvp(grad(ours), (x.detach(),), (tangent,))[1],
                               jvp(grad(ref), (x.detach(),), (tangent,))[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_parameters_match_cpu() -> None:
    cpu = get_network("convnet", 3, NUM_CLASSES, 32, seed=5)
    gpu = get_network("convnet", 3, NUM_CLASSES, 32, seed=5, device="cuda")
    assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu.state_dict().values(), gpu.state_dict().values()))
