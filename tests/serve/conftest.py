"""Fixtures: a registry with three adapters of different kinds, a served tiny base on loopback, and an
independent offline base (same deterministic tiny weights) that computes the expected completions; and a
real Hugging Face chat checkpoint built with transformers (hf_chat_setup.py), served in fp32 as "smol"
with a registry of its own."""

from __future__ import annotations

import httpx
import pytest
from hf_chat_setup import build_checkpoint, load_hf_chat
from serving_setup import Offline, Served, make_base, make_registry

from adapterhub.adapter import random_adapter
from adapterhub.registry import Registry
from adapterhub.serve.api import create_app
from adapterhub.serve.engine import Engine, EngineConfig
from adapterhub.serve.server import serve_in_thread


@pytest.fixture(scope="session")
def registry(tmp_path_factory) -> Registry:
    return make_registry(tmp_path_factory.mktemp("registry"))


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


@pytest.fixture(scope="session")
def hf_chat(tmp_path_factory):
    """The directory of the transformers-saved chat checkpoint."""
    pytest.importorskip("transformers")
    return build_checkpoint(tmp_path_factory.mktemp("hf-chat"))


@pytest.fixture(scope="module")
def chat_served(hf_chat, tmp_path_factory):
    """The chat checkpoint served as "smol" (fp32, dense), its registry holding one adapter task, "hfsql"."""
    base = load_hf_chat(hf_chat)
    registry = Registry(tmp_path_factory.mktemp("hf-registry"))
    registry.push(random_adapter(base.module_shapes(), r=4, seed=5, target_modules=("q_proj", "v_proj")), "hfsql")
    engine = Engine(base, registry, EngineConfig(max_batch=4, max_queue=32, base_name="smol"))
    try:
        with serve_in_thread(create_app(engine, api_key="")) as url, httpx.Client(base_url=url, timeout=120) as c:
            yield Served(url, engine, c)
    finally:
        engine.close()
