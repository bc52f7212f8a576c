"""Shared fixtures. Unit tests live in tests/unit/ (in-process, tiny models), end-to-end tests in tests/e2e/ (entry points as subprocesses, whole jobs and Trainer fits)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine, oversubscribed OpenMP threads are much slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
