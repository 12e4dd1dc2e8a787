"""One real Ray cluster and one real vLLM engine (the default SmolLM2 model) for the whole test session.

The app under test runs with API keys on, so that auth is exercised on every request.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest

for _key, _value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
                     "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "RAY_DEDUP_LOGS": "0"}.items():
    os.environ.setdefault(_key, _value)

TEST_KEY = "sk-tuneserve-test-key"
MODEL_ID = "smollm2-135m-instruct"
TEST_MAX_MODEL_LEN = 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray started by this session (random ports, own temp dir), stopped at the end."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="ts-ray-", dir="/tmp")
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp_dir,
             runtime_env={"env_vars": {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}})
    yield ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def app_config():
    from serve_app.config import AppConfig

    return AppConfig.model_validate({
        "models": [{
            "id": MODEL_ID,
            "path": "default",
            "max_model_len": TEST_MAX_MODEL_LEN,
            "num_replicas": 1,
            "resources": {"num_cpus": 1},
            "engine_kwargs": {"enforce_eager": True, "max_num_seqs": 16},
        }],
        "ingress": {"max_body_bytes": 256 * 1024, "max_n": 4,
                    "api_keys": [{"name": "tests", "sha256": _sha256(TEST_KEY)}]},
    })


def _sha256(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture(scope="session")
def server(ray_cluster, app_config) -> str:
    """Base URL (http://127.0.0.1:PORT) of the deployed tuneserve app."""
    from ray import serve

    from cluster.model_cache import ensure_default_model
    from serve_app.app import build_from_config

    ensure_default_model()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_from_config(app_config), name="tuneserve", route_prefix="/")
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key=TEST_KEY, max_retries=0, timeout=120)


@pytest.fixture
async def async_client(server):
    """Per test: an async client's connection pool belongs to the event loop of the test that made it."""
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=f"{server}/v1", api_key=TEST_KEY, max_retries=0, timeout=120) as client:
        yield client


@pytest.fixture(scope="session")
def http(server):
    """A plain HTTP client with the key set, for what the openai SDK cannot send (bad bodies)."""
    import httpx

    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {TEST_KEY}"}, timeout=120) as session:
        yield session


@pytest.fixture(scope="session")
def engine_handle(server):
    from ray import serve

    from serve_app.app import engine_deployment_name

    return serve.get_deployment_handle(engine_deployment_name(MODEL_ID), app_name="tuneserve")


REPO_ROOT = Path(__file__).resolve().parent.parent
