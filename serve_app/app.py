"""Builds the Serve application from the typed config: one engine deployment per model, one ingress.

    serve run serve_app/configs/serve.yaml            # Serve config file, shipped in the repo
    serve run serve_app.app:build_app config=path/to/models.yaml
"""

from __future__ import annotations

import logging
from pathlib import Path

from ray import serve
from ray.serve import Application

from cluster.http_ingress import serve_env
from cluster.resources import cluster_has_gpus
from serve_app.config import (DEFAULT_CONFIG, HEAD_NODE_RESOURCE, AppConfig, ModelConfig, engine_deployment_name,
                              load_config)
from cluster.engine_defaults import CPU_ENGINE_ENV
from serve_app.engine import ENGINE_ENV, EngineDeployment
from serve_app.ingress import Ingress
from serve_app.replica_router import request_router_config

log = logging.getLogger("tuneserve.app")
INGRESS_HEADROOM = 64  # Serve slots above the guard's limit: /health, /metrics, and the guard's own 503s
DRAIN_POLL_S = 1.0  # a draining replica checks this often whether its last request has finished


def _engine_app(model: ModelConfig, gpus_present: bool, config: AppConfig) -> Application:
    num_gpus = model.resources.num_gpus
    if num_gpus == "auto":
        num_gpus = model.tensor_parallel_size if gpus_present else 0
    on_gpu = num_gpus > 0
    check_quantization(model, on_gpu)
    env = {**serve_env(), **ENGINE_ENV, **({} if on_gpu else CPU_ENGINE_ENV)}
    actor_options = {"num_cpus": model.resources.num_cpus, "num_gpus": num_gpus,
                     "runtime_env": {"env_vars": env}}
    deployment = serve.deployment(EngineDeployment).options(
        name=engine_deployment_name(model.id),
        ray_actor_options=actor_options,
        max_ongoing_requests=model.max_ongoing_requests,
        max_queued_requests=model.max_queued_requests,
        health_check_period_s=10,
        health_check_timeout_s=60,
        graceful_shutdown_timeout_s=model.drain_timeout_s,
        graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
        max_replicas_per_node=model.max_replicas_per_node,
        **model.serve_scaling(),
    )
    router = request_router_config(model)
    if router is not None:
        deployment = deployment.options(request_router_config=router)
    return deployment.bind(model, on_gpu, config.adapter_registry.path, config.ingress.placement == "head")


def check_quantization(model: ModelConfig, on_gpu: bool) -> None:
    """The model's quantization against its folder (where readable from here) and the machine its engine
    runs on: refused now, with the reason, rather than at each replica's start."""
    from serve_app import quantization

    folder_config = {} if model.path == "default" else quantization.read_folder_config(model.path)
    machine = quantization.GPU_MACHINE if on_gpu else quantization.CPU_MACHINE
    quantization.resolve(model.id, model.quantization, quantization.folder_method(folder_config or {}), machine,
                         model.engine_kwargs, folder_known=folder_config is not None)


def check_storage_paths(config: AppConfig) -> None:
    """Every model and adapter must be there now: a wrong URI or a local folder that does not exist fails the
    deploy at once, with the path and the reason, instead of replicas failing one by one on their nodes."""
    from cluster.storage import StorageError, check, is_uri

    for model in config.models:
        for what, path in [(f"model {model.id}", model.path)] + [(f"adapter {a.id}", a.path) for a in model.adapters]:
            if is_uri(path):
                try:
                    check(path, must_exist=True)
                except StorageError as exc:
                    raise ValueError(f"{what}: {exc}") from exc
            elif _names_a_local_folder(path) and _local_folder(path) is None:
                raise ValueError(f"{what}: the local folder {path} does not exist on this node. On a cluster, "
                                 "name it by storage URI (s3://, gs://, file://) so that every node can fetch it.")
        for adapter in model.adapters:
            _check_adapter_config(adapter.id, adapter.path)


def _names_a_local_folder(path: str) -> bool:
    """A path, not `default` or a hub id (`org/name`): absolute, from home, explicitly relative, or deeper."""
    if path == "default":
        return False
    return path.startswith(("/", "~", "./", "../")) or path.count("/") > 1


def _local_folder(path: str) -> Path | None:
    """Where a local path is on this node: as given (absolute, or from this process's folder), else under the
    project folder, where `serve deploy` builds the app from; None where it is in neither."""
    from cluster.storage import project_root

    for candidate in (Path(path).expanduser(), project_root() / path):
        if candidate.exists():
            return candidate
    return None


def _check_adapter_config(adapter_id: str, path: str) -> None:
    import json

    from cluster.storage import StorageError, is_uri, locate
    from serve_app.lora_registry import adapter_rank

    try:
        text = (locate(path).join("adapter_config.json").read_text() if is_uri(path)
                else ((_local_folder(path) or Path(path)) / "adapter_config.json").read_text())
        adapter_rank(json.loads(text), f"adapter {adapter_id} ({path})")
    except (OSError, StorageError) as exc:
        raise ValueError(f"adapter {adapter_id}: {path} is not a PEFT adapter folder: no readable "
                         f"adapter_config.json ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"adapter {adapter_id}: {path}/adapter_config.json is not valid JSON ({exc})") from None


def check_engine_settings(config: AppConfig) -> None:
    """What vLLM would refuse only as each replica starts, refused now: unknown engine arguments (with the
    nearest valid name) and tool or reasoning parsers this vLLM does not have."""
    import difflib

    from serve_app import vllm_compat

    arguments = vllm_compat.engine_argument_names()
    parsers = {"tool_parser": vllm_compat.tool_parser_names(),
               "reasoning_parser": vllm_compat.reasoning_parser_names()}
    for model in config.models:
        for key in model.engine_kwargs:
            if key not in arguments:
                nearest = difflib.get_close_matches(key, arguments, n=1)
                hint = f"; did you mean '{nearest[0]}'?" if nearest else ""
                raise ValueError(f"model {model.id}: engine_kwargs.{key} is not an engine argument of vLLM "
                                 f"{vllm_compat.VERSION}{hint}")
        for setting, known in parsers.items():
            name = getattr(model, setting)
            if name is not None and known is not None and name not in known:
                nearest = difflib.get_close_matches(name, known, n=3)
                raise ValueError(f"model {model.id}: {setting} '{name}' is not one of vLLM {vllm_compat.VERSION}'s"
                                 f" parsers{' (nearest: ' + ', '.join(nearest) + ')' if nearest else ''}")


def check_access(config: AppConfig) -> AppConfig:
    """Keys read where the app is built (a key named by an unset variable fails the build), and the app
    refused if Serve listens beyond loopback with none. The replicas check the exposure again, for apps
    built before Serve started."""
    from serve_app.auth import check_exposure, serve_listen_host

    ingress = config.ingress
    keys = [key.resolved() for key in ingress.api_keys]
    listen_host = serve_listen_host()
    if listen_host is not None:
        check_exposure(keys, listen_host, ingress.allow_unauthenticated)
    return config.model_copy(update={"ingress": ingress.model_copy(update={"api_keys": keys})})


def build_from_config(config: AppConfig) -> Application:
    config = check_access(config)
    check_storage_paths(config)
    check_engine_settings(config)
    gpus_present = cluster_has_gpus()
    engines = {model.id: _engine_app(model, gpus_present, config) for model in config.models}
    actor_options = {"num_cpus": 0, "runtime_env": {"env_vars": serve_env()}}
    if config.ingress.placement == "head":
        actor_options["resources"] = {HEAD_NODE_RESOURCE: 0.001}  # Ray's marker resource of the head node
    # Serve's bound sits above the guard's, so that the guard sheds first, in OpenAI's format.
    ingress = Ingress.options(num_replicas=config.ingress.num_replicas, ray_actor_options=actor_options,
                              max_ongoing_requests=config.ingress.max_ongoing_requests + INGRESS_HEADROOM,
                              graceful_shutdown_timeout_s=config.ingress.drain_timeout_s,
                              graceful_shutdown_wait_loop_s=DRAIN_POLL_S)
    return ingress.bind(config, engines)


def build_app(args: dict | None = None) -> Application:
    """Serve application builder: `args.config` names the YAML config (default: configs/default.yaml)."""
    path = Path((args or {}).get("config") or DEFAULT_CONFIG)
    if not path.is_absolute() and not path.exists():  # `serve deploy` builds in the controller's cwd
        path = Path(__file__).resolve().parent.parent / path
    config = load_config(path)
    log.info("building tuneserve from %s: models %s", path, [m.id for m in config.models])
    return build_from_config(config)
