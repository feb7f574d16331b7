"""Cache-sized class chunks change the speed of a step, never its result."""
from __future__ import annotations

import pytest
import torch

from ddlib.data import load_dataset
from ddlib.methods import get_method, make_config


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", image_size=8)


@pytest.mark.parametrize("method", ["dm", "datadam"])
@pytest.mark.parametrize("dsa", [False, True])
def test_chunked_step_equals_one_pass(digits, method, dsa):
    def images_after_two_steps(chunk: int) -> torch.Tensor:
        cfg = make_config(method, ipc=3, batch_real=8, dsa=dsa, chunk=chunk, lr_img=0.5)
        d = get_method(method)(digits, cfg, seed=0)
        assert len(d.class_chunks(d.net, cfg.ipc)) == (10 if chunk == 3 else 1)
        for it in range(2):
            scalars = d.step(it)
        return d.images.detach(), scalars["loss"]

    whole, whole_loss = images_after_two_steps(10_000)
    chunked, chunked_loss = images_after_two_steps(3)  # one class per chunk
    assert torch.allclose(chunked_loss, whole_loss, rtol=1e-5)
    assert torch.allclose(chunked, whole, atol=1e-5)


def test_batchnorm_nets_get_one_chunk(digits):
    cfg = make_config("datadam", ipc=2, batch_real=4, norm="batch", chunk=2)
    d = get_method("datadam")(digits, cfg, seed=0)
    assert d.class_chunks(d.net, 2) == [slice(0, 10)]
