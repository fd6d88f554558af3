"""Shared fixtures: tiny seeded models and padded batches (built by parity.py), and one thread for tiny models."""

from __future__ import annotations

import os

import pytest
import torch

from parity import build_batch, build_tiny
from parity import tiny_bert_config  # noqa: F401 - test_training.py imports it from here

# Two threads, or what OMP_NUM_THREADS says (`make test` runs the unit tests on one, beside a chapter).
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))


@pytest.fixture
def tiny_model():
    """``tiny_model(kind, seed=0, hidden_size=32, **config_overrides)``; kinds: bert, bert_cls, llama, llama_cls."""
    return build_tiny


@pytest.fixture
def tiny_batch():
    """``tiny_batch(kind, batch=3, seq=8, seed=0)``: input_ids, attention_mask with zeros, labels."""
    return build_batch


@pytest.fixture
def one_thread_for_tiny_models(request):
    """Tiny models run on one thread; only the real models (``slow``) use both (set above).

    A 32-wide layer gains nothing from a second thread, and when the 2 cores are busy with other
    work the OpenMP hand-offs dominate: measured on this machine under load, the fast tests of
    test_lora.py took 4 s with 1 thread and 98 s with 2. A module asks for it with
    ``pytestmark = pytest.mark.usefixtures("one_thread_for_tiny_models")``.
    """
    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
