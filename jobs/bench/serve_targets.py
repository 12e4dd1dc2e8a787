"""The serving stacks a benchmark compares, each started with the same model and engine arguments:

- `tuneserve`: our Serve app (ingress + AsyncLLM engine deployment);
- `vllm`: vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`);
- `vllm+router`: the same server, measured directly and also through our router (an app with no local
  engine whose remote provider is that server: ingress → routing → pooled HTTP → SSE re-rendering);
- `rayllm`: Ray's `ray.serve.llm` OpenAI app;
- `tuneserve=DIR`: our app as the checkout in DIR builds it, in its own process and Ray instance (a
  before/after pair in one run: `tuneserve=/tmp/before,tuneserve=.`).

Each is a context manager that yields {label: base URL (`http://127.0.0.1:PORT/v1`)} and stops what it
started.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from cluster.engine_defaults import CPU_ENGINE_ENV
from cluster.ports import free_port, wait_ready


@dataclass
class EngineSpec:
    """The engine arguments every target gets."""

    model_id: str
    path: str
    dtype: str
    max_model_len: int
    max_num_seqs: int
    enforce_eager: bool
    on_gpu: bool
    extra: dict | None = None

    def vllm_kwargs(self) -> dict:
        """Raw vLLM's arguments. dtype "auto" is our engine's default on this machine (serve_app/engine.py), so
        that raw vLLM and each app, which resolves "auto" itself, run the dtype a user gets."""
        dtype = self.dtype
        if dtype == "auto":
            from cluster.engine_defaults import resolve_dtype

            dtype = resolve_dtype("auto", self.on_gpu)
        kwargs = {"dtype": dtype, "max_model_len": self.max_model_len, "max_num_seqs": self.max_num_seqs,
                  "enforce_eager": self.enforce_eager}
        kwargs.update(self.extra or {})
        return kwargs


def _stop(process: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout_s`."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def fake_upstream(name: str, workers: int = 1) -> Iterator[tuple[str, subprocess.Popen]]:
    """The test suite's OpenAI-compatible fake (tests/upstream.py: fast `echo`, and faults on demand) in
    processes of its own on loopback, so that it never shares a core's event loop with what is measured.
    Yields its /v1 URL and the process. Benchmarks run from a checkout, where tests/ is."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "tests.upstream", "--port", str(port), "--name", name,
                                "--workers", str(workers)])
    try:
        wait_ready(f"http://127.0.0.1:{port}/v1/models", timeout_s=60, process=process)
        yield f"http://127.0.0.1:{port}/v1", process
    finally:
        _stop(process, timeout_s=10)


@contextlib.contextmanager
def raw_vllm(spec: EngineSpec, with_router: bool = False, process_info: dict | None = None
             ) -> Iterator[dict[str, str]]:
    """vLLM's OpenAI server; `process_info`, when given, receives its "pid" and "log" path."""
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
           "--model", spec.path, "--served-model-name", spec.model_id]
    for key, value in spec.vllm_kwargs().items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            cmd.append(flag)
        elif isinstance(value, (dict, list)):
            cmd += [flag, json.dumps(value)]
        elif value is not False:
            cmd += [flag, str(value)]
    env = {**os.environ, **({} if spec.on_gpu else CPU_ENGINE_ENV)}
    log = tempfile.NamedTemporaryFile(prefix="bench-vllm-", suffix=".log", delete=False)
    process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if process_info is not None:
        process_info.update(pid=process.pid, log=log.name)
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", process=process)
        url = f"http://127.0.0.1:{port}/v1"
        if with_router:
            with router_in_front(spec, url) as router_url:
                yield {"vllm": url, "router": router_url}
        else:
            yield {"vllm": url}
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}; vLLM's log: {log.name}") from None
    finally:
        _stop(process, timeout_s=30)


@contextlib.contextmanager
def served(app, name: str = "bench") -> Iterator[str]:
    """Run a Serve application on a free port of 127.0.0.1, yield its base URL, shut Serve down after."""
    from ray import serve

    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app, name=name, route_prefix="/")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        serve.shutdown()


@contextlib.contextmanager
def router_in_front(spec: EngineSpec, upstream_url: str) -> Iterator[str]:
    """Our app with no local engine, routing the model to `upstream_url` as a remote provider."""
    from serve_app.app import build_from_config
    from serve_app.config import AppConfig

    config = AppConfig.model_validate({"providers": [{
        "name": "upstream", "base_url": upstream_url, "models": [{"id": spec.model_id}], "max_concurrency": 1024,
        "timeouts": {"read_s": 600}}]})
    with served(build_from_config(config)) as url:
        yield url


def tuneserve_config(spec: EngineSpec, stream_interval_ms: float | None = None, replicas: int = 1,
                     autoscale_to: int | None = None, ingress_replicas: int | None = None,
                     target_ongoing_requests: float = 48) -> dict:
    """The app config of the bench: `replicas` engine replicas, or autoscaling from 1 to `autoscale_to` on
    ongoing requests; one ingress replica per engine replica unless `ingress_replicas` is given."""
    scaling = {"num_replicas": replicas} if autoscale_to is None else {"autoscaling_config": {
        "min_replicas": 1, "max_replicas": autoscale_to, "target_ongoing_requests": target_ongoing_requests,
        "upscale_delay_s": 5, "downscale_delay_s": 600}}
    return {"models": [{
        "id": spec.model_id, "path": spec.path, "dtype": spec.dtype, "max_model_len": spec.max_model_len,
        **scaling, "max_ongoing_requests": 256,
        **({} if stream_interval_ms is None else {"stream_interval_ms": stream_interval_ms}),
        "resources": {"num_cpus": 1, "num_gpus": 1 if spec.on_gpu else 0},
        "engine_kwargs": {k: v for k, v in spec.vllm_kwargs().items() if k not in ("dtype", "max_model_len")},
    }], "ingress": {"num_replicas": ingress_replicas or autoscale_to or replicas}}


@contextlib.contextmanager
def tuneserve(spec: EngineSpec, checkout: str | None = None, **options) -> Iterator[dict[str, str]]:
    """Our app, in this process's Ray instance, or (`checkout`) as another source tree builds it."""
    if checkout is not None:
        with tuneserve_from_checkout(spec, checkout, **options) as urls:
            yield urls
        return
    from serve_app.app import build_from_config
    from serve_app.config import AppConfig

    with served(build_from_config(AppConfig.model_validate(tuneserve_config(spec, **options)))) as url:
        yield {"tuneserve": url}


# Runs in the other checkout, which is first on its PYTHONPATH: its own Ray instance, its own serve_app.
_CHECKOUT_SERVER = """
import json, signal, sys, time
import ray
from ray import serve
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so that atexit stops Serve and this Ray instance
ray.init(address="local", include_dashboard=False, log_to_driver=False)
from serve_app.app import build_from_config
from serve_app.config import AppConfig
serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[2])})
try:
    serve.run(build_from_config(AppConfig.model_validate(json.loads(sys.argv[1]))), name="bench", route_prefix="/")
    while True:
        time.sleep(3600)
finally:
    serve.shutdown()
    ray.shutdown()
"""


@contextlib.contextmanager
def tuneserve_from_checkout(spec: EngineSpec, checkout: str, **options) -> Iterator[dict[str, str]]:
    root = os.path.abspath(checkout)
    if not os.path.isdir(os.path.join(root, "serve_app")):
        raise ValueError(f"tuneserve={checkout}: no serve_app/ in {root}")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    log = tempfile.NamedTemporaryFile(prefix="bench-checkout-", suffix=".log", delete=False)
    process = subprocess.Popen([sys.executable, "-c", _CHECKOUT_SERVER, json.dumps(tuneserve_config(spec, **options)),
                                str(port)], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(f"http://127.0.0.1:{port}/v1/models", process=process)
        yield {f"tuneserve={checkout}": f"http://127.0.0.1:{port}/v1"}
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}; the app's log: {log.name}") from None
    finally:
        _stop(process, timeout_s=120)  # Serve and Ray shut down; the GPU must be free for the next target


@contextlib.contextmanager
def ray_serve_llm(spec: EngineSpec) -> Iterator[dict[str, str]]:
    from ray.serve.llm import LLMConfig, build_openai_app

    engine_kwargs = spec.vllm_kwargs()
    llm_config = LLMConfig(
        model_loading_config={"model_id": spec.model_id, "model_source": spec.path},
        engine_kwargs=engine_kwargs,
        accelerator_config={"kind": "gpu"} if spec.on_gpu else {"kind": "cpu"},
        deployment_config={"num_replicas": 1, "max_ongoing_requests": 256},
        runtime_env=None if spec.on_gpu else {"env_vars": dict(CPU_ENGINE_ENV)},
    )
    app = build_openai_app({"llm_configs": [llm_config],
                            "ingress_deployment_config": {"ray_actor_options": {"num_cpus": 0}}})
    with served(app) as url:
        yield {"rayllm": url}


def running_engine_replicas() -> int:
    """Engine replicas in RUNNING state in the bench app (for time-to-scale)."""
    from ray import serve

    app = serve.status().applications.get("bench")
    if app is None:
        return 0
    return sum(d.replica_states.get("RUNNING", 0) for name, d in app.deployments.items() if name.startswith("Engine"))


TARGETS = {"vllm": raw_vllm, "tuneserve": tuneserve, "rayllm": ray_serve_llm}
