"""One real Ray cluster and one real vLLM engine (the default SmolLM2 model) for the whole test session.

The app under test runs with API keys on, so that auth is exercised on every request.
"""

from __future__ import annotations

import importlib
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from cluster.ports import FREE_PORT_LOW, free_port

pytest_plugins = ["tests.multinode_cluster"]  # the `cluster` fixture of the multi-node tests

for _key, _value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
                     "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "RAY_DEDUP_LOGS": "0",
                     # processes hand their metrics to Ray's exporter every second, not every ten
                     "RAY_metrics_report_interval_ms": "1000"}.items():
    os.environ.setdefault(_key, _value)

TEST_KEY = "sk-tuneserve-test-key"  # the admin key of KEYS below
MODEL_ID = "smollm2-135m-instruct"
EMBED_MODEL_ID = "smollm2-embed"
TEST_MAX_MODEL_LEN = 1024
ENGINE_MAX_ONGOING = 8  # the test engine's request slots: /health must not wait for one
ENGINE_MAX_QUEUED = 2  # requests the ingress holds for it beyond those; the next ones are shed
REPO_ROOT = Path(__file__).resolve().parent.parent


def scrape(base: str, needles: list[str], limit_s: float = 30.0, key: str = TEST_KEY) -> str:
    """GET /metrics (admin key) until it holds every needle: Ray's exporter takes its figures every second."""
    import time

    import httpx

    deadline = time.monotonic() + limit_s
    while True:
        text = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=30).text
        missing = [needle for needle in needles if needle not in text]
        if not missing:
            return text
        assert time.monotonic() < deadline, f"/metrics lacks {missing}:\n{text[:3000]}"
        time.sleep(0.5)


_HANDED_OUT_BLOCKS: list[range] = []  # a Ray head's worker range is reserved long before its ports are bound


def free_port_block(size: int) -> int:
    """The first port of `size` consecutive free ports on 127.0.0.1, overlapping no block handed out before."""
    import random

    for _ in range(200):
        # Below the ports cluster.ports.free_port hands out (24000 up to Linux's ephemeral range, where client
        # sockets could take a port after this check), above Ray's default worker ports.
        base = random.SystemRandom().randint(20000, FREE_PORT_LOW - size)
        if any(base < block.stop and block.start < base + size for block in _HANDED_OUT_BLOCKS):
            continue
        try:
            socks = []
            for port in range(base, base + size):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            _HANDED_OUT_BLOCKS.append(range(base, base + size))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free port block")


# The project's own head for this session, on free ports and a private temp dir. Set before anything
# imports ray: ray reads its auth settings once, at import.
# One block for both, so that the head's ports and the worker range cannot overlap.
_BASE_PORT = free_port_block(8 + 200)
_WORKER_PORTS = _BASE_PORT + 8
os.environ.update({
    "TUNESERVE_RAY_DIR": tempfile.mkdtemp(prefix="ts-ray-", dir="/tmp"),
    "TUNESERVE_RAY_PORT": str(_BASE_PORT),
    "TUNESERVE_DASHBOARD_PORT": str(free_port()),
    "TUNESERVE_RAY_WORKER_PORTS": f"{_WORKER_PORTS}-{_WORKER_PORTS + 199}",
})
from cluster import local

os.environ.update({k: v for k, v in local.client_env().items() if k != "RAY_ADDRESS"})
importlib.import_module("ray")  # this process keeps 127.0.0.1 for the local head: Ray reads that at import

# The commands the tests run get a user's shell instead, which does not have this: a job that imported ray
# before cluster.local.connect() would reach the head through the host's external address, and must fail.
os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")


@pytest.fixture(scope="session")
def ray_head():
    """`python -m cluster.local up`, the path a user takes; stopped by PID at the end, and checked to
    leave no process behind."""
    import ray

    local.up(num_cpus=2)
    try:
        ray.init(address=local.gcs_address(), log_to_driver=False)
        yield local
    finally:
        ray.shutdown()
        local.down()
        # The quantizer's pip runtime env (test_quantize_job) is ~4 GiB in the session folder; the logs stay.
        for env_cache in Path(os.environ["TUNESERVE_RAY_DIR"]).glob("session_*/runtime_resources"):
            shutil.rmtree(env_cache, ignore_errors=True)
    leftovers = local.our_processes()
    assert not leftovers, f"cluster.local down left processes behind: {leftovers}"


KEYS = {  # name -> (key, policy)
    "tests": ("sk-tuneserve-test-key", {"admin": True}),
    "limited": ("sk-limited", {"rpm": 2}),
    "tokens": ("sk-tokens", {"tpm": 40}),
    "restricted": ("sk-restricted", {"models": ["echo-model"]}),
}


@pytest.fixture(scope="session")
def upstreams():
    """Two real misbehaving OpenAI-compatible servers (tests/upstream.py) on 127.0.0.1."""
    from tests.upstream import UpstreamServer

    servers = {name: UpstreamServer(name).start() for name in ("alpha", "beta")}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="session")
def vllm_upstream():
    """vLLM's own OpenAI server on the default model: a real remote provider for the router."""
    import subprocess
    import sys

    from cluster.engine_defaults import CPU_ENGINE_ENV
    from cluster.model_cache import ensure_default_model

    port = free_port()
    log = open(tempfile.mkstemp(prefix="vllm-upstream-", suffix=".log")[1], "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
         "--model", str(ensure_default_model()), "--served-model-name", "smollm2-upstream", "--dtype", "float32",
         "--enforce-eager", "--max-model-len", str(TEST_MAX_MODEL_LEN), "--max-num-seqs", "8"],
        env={**os.environ, **CPU_ENGINE_ENV}, stdout=log, stderr=subprocess.STDOUT)
    yield {"url": f"http://127.0.0.1:{port}", "process": process, "log": log.name}
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def _provider(name: str, url: str, upstream_model: str, price=(0.1, 0.2), **extra) -> dict:
    """A provider offering `echo-model`. Its breaker only opens in the breaker test ("switchy"), so that
    tests do not depend on each other's failures."""
    return {"name": name, "base_url": url, "models": [{"id": "echo-model", "upstream": upstream_model,
                                                       "price": {"prompt": price[0], "completion": price[1]}}],
            "retry": {"attempts": 2, "backoff_s": 0.05, "max_backoff_s": 2.0},
            "circuit_breaker": {"failure_threshold": 1000}, **extra}


OWNER = "Crohcirtep"
ADAPTER_ID = "assistant-lora"


@pytest.fixture(scope="session")
def assistant_weights(ray_head, tmp_path_factory) -> dict:
    """A short real run of the personal-assistant recipe on the default model (the shipped CPU recipe with
    fewer, shorter rows and a higher learning rate): its adapter and merged model, for serving tests."""
    import json
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("assistant")
    data = folder / "assistant.jsonl"
    subprocess.run([sys.executable, "-m", "jobs.data", "identity", "--name", OWNER, "--out", str(data),
                    "--count", "400"], cwd=REPO_ROOT, check=True, capture_output=True)
    result = subprocess.run(
        [sys.executable, "-m", "jobs.finetune", "--config", str(REPO_ROOT / "jobs/configs/assistant_cpu.yaml"),
         f"data.train=[{data}]", "data.max_length=256", "train.max_steps=24", "train.grad_accum=1",
         "optim.lr=1e-3", "checkpoint.every_steps=24", "monitor.eval_every=null", "scaling.cpus_per_worker=2",
         # identity only, on every projection (fast to learn): the serving tests need no more
         "loss.distill_weight=0", "loss.distill_prompts=[]", "loss.distill_opening_tokens=0", "lora.target_modules=auto",
         "lora.input_share=0",
         f"output.dir={folder}", "output.name=assistant"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((folder / "assistant" / "summary.json").read_text())


@pytest.fixture(scope="session")
def app_config_file(tmp_path_factory, upstreams, vllm_upstream, assistant_weights) -> Path:
    """The test app: the default model with a short context, a real vLLM upstream offering the same model,
    misbehaving upstreams offering `echo-model`, and API keys on."""
    import yaml

    alpha, beta = upstreams["alpha"].url, upstreams["beta"].url
    providers = [
        {"name": "vllm", "base_url": vllm_upstream["url"] + "/v1",
         "models": [{"id": MODEL_ID, "upstream": "smollm2-upstream", "price": {"prompt": 0.5, "completion": 1.0}}],
         "timeouts": {"read_s": 120}},
        _provider("fast", alpha, "echo"),
        _provider("cheap", beta, "echo", price=(0.01, 0.02)),
        _provider("slowpoke", beta, "slow", price=(0.05, 0.05)),
        _provider("flaky", alpha, "rate-limited-1"),
        _provider("patient", alpha, "rate-limited-30"),
        _provider("broken", alpha, "error-500"),
        _provider("hanging", alpha, "hang", timeouts={"read_s": 1.0, "total_s": 2.0}, retry={"attempts": 1}),
        _provider("dropper", alpha, "drop"),
        _provider("picky", alpha, "bad-request"),
        _provider("limited-params", beta, "echo", supported_parameters=["max_tokens", "temperature"]),
        _provider("switchy", beta, "switch", retry={"attempts": 1},
                  circuit_breaker={"failure_threshold": 2, "cooldown_s": 2.0}),
        {"name": "broken-only", "base_url": alpha, "models": [{"id": "lonely-model", "upstream": "error-500"}],
         "retry": {"attempts": 1}, "circuit_breaker": {"failure_threshold": 1000}},
        # the OpenAI-surface tests: tool calls and extra fields relayed; malformed answers; remote embeddings
        {"name": "toolsmith", "base_url": alpha, "models": [{"id": "tools-model", "upstream": "tools"}]},
        {"name": "garbled", "base_url": alpha, "models": [{"id": "garbled-model", "upstream": "malformed"}],
         "retry": {"attempts": 1}, "circuit_breaker": {"failure_threshold": 1000}},
        {"name": "embedder", "base_url": beta, "models": [{"id": "remote-embed", "upstream": "vectors",
                                                           "task": "embed"}]},
    ]
    config = {
        "models": [{
            "id": MODEL_ID,
            "path": "default",
            "max_model_len": TEST_MAX_MODEL_LEN,
            "num_replicas": 1,
            "max_ongoing_requests": ENGINE_MAX_ONGOING,
            "max_queued_requests": ENGINE_MAX_QUEUED,
            "resources": {"num_cpus": 1},
            "engine_kwargs": {"enforce_eager": True, "max_num_seqs": 16},
            # the fine-tuned adapter, served by this engine through vLLM's LoRA support
            "adapters": [{"id": ADAPTER_ID, "path": assistant_weights["adapter"]}],
            # and adapters registered at runtime (tests/test_live_adapters.py); one held at a time, so that
            # two adapters take turns through eviction and reload
            "live_adapters": {"enabled": True, "cache_size": 1},
            # one replica, but the prefix router all the same (the default from two replicas up): every
            # serving test, static and live adapters among them, goes through it
            "routing": "prefix",
        }, {
            # the same weights served as an embedding model, through vLLM's pooling runner; no CPU reserved,
            # so that the fine-tune tests after the serving tests still find their 2 CPUs
            "id": EMBED_MODEL_ID,
            "path": "default",
            "task": "embed",
            "max_model_len": 512,
            "num_replicas": 1,
            "resources": {"num_cpus": 0},
            "engine_kwargs": {"enforce_eager": True},
        }],
        "providers": providers,
        "aliases": {"smart": ["lonely-model", "echo-model"]},
        "adapter_registry": {"path": f"file://{tmp_path_factory.mktemp('adapters')}"},
        # adapters registered at runtime may come from this session's folders only
        "storage": {"allowed_roots": [f"file://{tmp_path_factory.getbasetemp()}"]},
        "ingress": {"max_body_bytes": 256 * 1024, "max_n": 4,
                    "usage_store": {"path": f"file://{tmp_path_factory.mktemp('usage')}"},
                    "api_keys": [{"name": name, "sha256": _sha256(key), **policy}
                                 for name, (key, policy) in KEYS.items()]},
    }
    path = tmp_path_factory.mktemp("config") / "app.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _sha256(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture(scope="session")
def server(ray_head, app_config_file, vllm_upstream, tmp_path_factory) -> str:
    """Base URL of the app, deployed with `serve deploy` from the Serve config file shipped in the repo
    (only its port and app config path changed)."""
    import subprocess
    import sys
    import time

    import yaml
    from ray import serve

    from cluster.model_cache import ensure_default_model

    ensure_default_model()
    port = free_port()
    serve_config = yaml.safe_load((REPO_ROOT / "serve_app" / "configs" / "serve.yaml").read_text())
    serve_config["http_options"]["port"] = port
    serve_config["applications"][0]["args"]["config"] = str(app_config_file)
    serve_file = tmp_path_factory.mktemp("serve") / "serve.yaml"
    serve_file.write_text(yaml.safe_dump(serve_config))
    serve_cli = str(Path(sys.executable).parent / "serve")
    subprocess.run([serve_cli, "deploy", str(serve_file), "--address", ray_head.dashboard_url()], check=True)
    deadline = time.monotonic() + 600
    while True:
        status = serve.status().applications.get("tuneserve")
        if status is not None and status.status == "RUNNING":
            break
        assert status is None or status.status != "DEPLOY_FAILED", status.message
        assert time.monotonic() < deadline, f"app not running after 600 s: {status}"
        time.sleep(1)
    from cluster.ports import wait_ready

    wait_ready(vllm_upstream["url"] + "/health", timeout_s=600, process=vllm_upstream["process"])
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


_MODULE_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report):
    """Setup, call and teardown time per module (session fixtures count where they start), for the summary."""
    module = report.nodeid.split("::")[0]
    _MODULE_SECONDS[module] = _MODULE_SECONDS.get(module, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    """The suite has a time budget: show where it goes, module by module."""
    if not _MODULE_SECONDS:
        return
    terminalreporter.section("seconds per module")
    for module, seconds in sorted(_MODULE_SECONDS.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"{seconds:8.1f}s  {module}")


def pytest_collection_modifyitems(items):
    """Offline-engine tests first: they start their own engines, best before the shared app's engines
    (and the vLLM upstream) take their share of this small machine's memory and cores. Then the training
    jobs, which need the head's CPUs before the app's engine holds one."""
    def order(item) -> int:
        if item.get_closest_marker("multinode"):  # its own cluster, started and stopped before the session's
            return -1
        if item.get_closest_marker("evaluate_offline"):
            return 0
        return 1 if item.get_closest_marker("finetune") else 2

    items.sort(key=order)
