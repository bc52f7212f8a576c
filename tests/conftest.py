"""Shared fixtures. Unit tests live in tests/unit/ (in-process, tiny models), end-to-end tests in tests/e2e/ (entry points as subprocesses, whole jobs and Trainer fits).

Plain helpers (the subprocess runner, markers, constants) are in tests/helpers.py, paths in tests/paths.py."""

from __future__ import annotations

import pytest
import torch

from jobs.schema import register_schemas


def pytest_configure(config):
    register_schemas()  # as the entry points do: conf/method/ composes from robustx.training.loss.MethodConfig


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine, oversubscribed OpenMP threads are much slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def isolated_data(monkeypatch, tmp_path):
    """No test touches the user's dataset cache or depends on (or leaks) a global Lightning seed."""
    monkeypatch.setenv("ROBUSTX_CACHE", str(tmp_path / "robustx-cache"))
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
