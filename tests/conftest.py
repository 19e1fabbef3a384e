"""Shared fixtures: the offline tiny model, and a local Ray cluster per test module."""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest

from rlfleet.models import resolve_model_path


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    """Directory of the offline ``builtin:tiny`` model (built once into the rlfleet cache)."""
    return resolve_model_path("builtin:tiny")


@contextmanager
def ray_test_env():
    """The environment of a test Ray cluster, restored afterwards: no token auth (tests do not exercise it;
    platform-notes) and no hub (inherited by the workers: tests never touch it)."""
    saved = {key: os.environ.get(key) for key in ("RAY_AUTH_MODE", "HF_HUB_OFFLINE")}
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster in this process for one test module (4 CPUs, no dashboard, no token auth).

    Yields the ``ray`` module. Shut down at the module's end, so a later module starts from no cluster.
    """
    import ray

    with ray_test_env():
        ray.init(num_cpus=4, include_dashboard=False)
        try:
            yield ray
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """The tiny model's ops are too small for intra-op threads: on a busy 2-core machine one thread runs a module of
    learner steps ~6x faster. Restored afterwards for other modules. Use with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
