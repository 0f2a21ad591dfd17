"""Shared fixtures: a fresh tiny SDXL-shaped UNet with sd-scripts' names for every test.

A fresh model per test matters: LyCORIS hooks ``forward`` of the layers it wraps, so a
model reused across tests would carry earlier adapters.
"""

from __future__ import annotations

import logging

import pytest
import torch

from blora_network.sdxl.unet import TINY, build_unet, random_inputs


@pytest.fixture(autouse=True)
def _quiet_and_seeded():
    torch.manual_seed(0)
    logging.getLogger("blora_network").setLevel(logging.INFO)
    yield


@pytest.fixture
def unet():
    return build_unet(TINY, seed=0)


@pytest.fixture
def batch():
    return random_inputs(TINY, batch=2, seed=1)


@pytest.fixture
def text_encoders():
    pytest.importorskip("transformers")
    from blora_network.sdxl.unet import build_text_encoders

    return build_text_encoders(seed=0)


@pytest.fixture
def one_thread():
    """Tiny tensors on 2 shared cores: OpenMP's thread hand-off costs milliseconds each when
    another process holds a core, so these tests run torch single-threaded (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
