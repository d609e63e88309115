"""Fixtures: a registry with three adapters of different kinds, a served tiny base on loopback, and an
independent offline base (same deterministic tiny weights) that computes the expected completions."""

from __future__ import annotations

import httpx
import pytest
from serving_setup import ADAPTERS, Offline, Served, make_base

from adapterhub.adapter import random_adapter
from adapterhub.registry import Registry
from adapterhub.serve.api import create_app
from adapterhub.serve.engine import Engine, EngineConfig
from adapterhub.serve.server import serve_in_thread


@pytest.fixture(scope="session")
def registry(tmp_path_factory) -> Registry:
    registry = Registry(tmp_path_factory.mktemp("registry"))
    shapes = make_base().module_shapes()
    for seed, (task, options) in enumerate(ADAPTERS.items(), start=1):
        registry.push(random_adapter(shapes, seed=seed, **options), task, tags=("prod",))
    return registry


@pytest.fixture(scope="module")
def served(registry):
    engine = Engine(make_base(), registry, EngineConfig(max_batch=8, max_queue=64))
    try:
        with serve_in_thread(create_app(engine, api_key="")) as url, httpx.Client(base_url=url, timeout=120) as c:
            yield Served(url, engine, c)
    finally:
        engine.close()


@pytest.fixture(scope="session")
def offline(registry) -> Offline:
    return Offline(registry)
