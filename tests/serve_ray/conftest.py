"""Fixtures: a real local Ray instance (2 CPUs, no dashboard) running the adapterhub application with two
engine replicas of the embedded tiny base in float32, a registry every replica reads, and an offline base
that computes the expected completions. The tests that need Ray skip when ray[serve] is not installed."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from ray_setup import Offline, make_registry

from adapterhub.registry import Registry

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class RayApp:
    url: str
    config: object  # RayServeConfig
    client: httpx.Client

    def complete(self, **body) -> httpx.Response:
        return self.client.post("/v1/completions", json=body)


@pytest.fixture(scope="session")
def registry(tmp_path_factory) -> Registry:
    return make_registry(tmp_path_factory.mktemp("registry"))


@pytest.fixture(scope="session")
def offline(registry) -> Offline:
    return Offline(registry)


@pytest.fixture(scope="module")
def ray_app(registry):
    ray = pytest.importorskip("ray", reason="ray[serve] is not installed (pip install 'adapterhub[ray]')")
    serve = pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'adapterhub[ray]')")
    from adapterhub.serve.ray import RayServeConfig, start

    # Ray's workers import adapterhub from this checkout, as the test process does.
    paths = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != "."]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, object_store_memory=100 * 2**20,
             configure_logging=False, log_to_driver=False)
    # Each replica reserves half a CPU (and runs torch on one thread): two fit the two CPUs Ray was given.
    config = RayServeConfig(base="tiny", registry=str(registry.location), dtype="float32", replicas=2,
                            max_adapters=4, max_batch=8, max_queue=32, replica_cpus=0.5, health_check_period_s=1.0)
    try:
        url = start(config, host="127.0.0.1", port=_free_port(), timeout_s=300)
        with httpx.Client(base_url=url, timeout=120) as client:
            _wait_until_both_replicas_report(client)
            yield RayApp(url, config, client)
    finally:
        serve.shutdown()
        ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_both_replicas_report(client: httpx.Client, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while "adapterhub_replicas 2" not in client.get("/metrics").text:
        assert time.monotonic() < deadline, "the two replicas did not report to the ingress in time"
        time.sleep(0.25)
