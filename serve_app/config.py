"""The one typed config file that drives `serve run` / `serve deploy`, the demo and the tests.

    models:
      - id: smollm2-135m-instruct
        path: default            # or a Hugging Face folder / hub id, or a storage URI (s3://, gs://,
                                 # file://) that each node fetches into its own cache once
        max_model_len: 2048
        num_replicas: 1          # or autoscaling_config: {min_replicas, max_replicas, ...}
        resources: {num_cpus: 1}
    ingress:
      api_keys: [{name: alice, sha256: <hex digest of the key>}]

Values of the form ${VAR} or ${VAR:-fallback} are taken from the environment when the file is read.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve_app.quantization import Quantization


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AutoscalingConfig(_Strict):
    """Passed to Ray Serve as the deployment's autoscaling_config."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = None
    target_ongoing_requests: float = Field(16, gt=0)
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 300.0

    @model_validator(mode="after")
    def _ordered(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError("autoscaling_config: min_replicas must be <= max_replicas")
        return self


class Resources(_Strict):
    """What one engine replica reserves. `num_gpus: auto` takes tensor_parallel_size GPUs when the
    cluster has GPUs at deploy time, else none (CPU engine). Set it explicitly for clusters whose GPU
    workers only start on demand."""

    num_cpus: float = Field(1, ge=0)
    num_gpus: float | Literal["auto"] = "auto"


Dtype = Literal["auto", "float32", "bfloat16", "float16"]
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$"
LOCAL_PROVIDER = "local"


class Price(_Strict):
    """USD per million tokens."""

    prompt: float = Field(0.0, ge=0)
    completion: float = Field(0.0, ge=0)

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.prompt + completion_tokens * self.completion) / 1e6


class AdapterConfig(_Strict):
    """A LoRA adapter (PEFT folder, as `jobs.finetune` writes it) served by its base model's engine under
    its own model id, through vLLM's LoRA support: no merge, one engine for the base and its adapters."""

    id: str = Field(pattern=NAME_PATTERN)
    path: str  # PEFT folder on every node, or a storage URI (e.g. s3://bucket/runs/finetune/<run>/adapter)
    price: Price | None = None  # default: the base model's


class LiveAdapters(_Strict):
    """LoRA adapters registered while the service runs (`POST /v1/adapters`, or a fine-tune's publish step),
    loaded by each engine replica when a request first needs one (serve_app/lora_registry.py). Off unless set
    (the shipped configs set it): with LoRA on, vLLM builds LoRA layers and buffers for `max_loras` adapters
    of `max_rank`, memory and work that an engine of the base model alone does not spend."""

    enabled: bool = False
    # vLLM's max_lora_rank: an adapter of a higher rank is refused at registration, not at first request.
    max_rank: int = Field(64, ge=1)
    max_loras: int = Field(4, ge=1)  # adapters in one engine batch (vLLM's max_loras)
    # Adapters each engine replica keeps loaded (least recently used leaves first); Serve's model
    # multiplexing sends an adapter's requests to replicas that hold it.
    cache_size: int = Field(8, ge=1)


class ModelConfig(_Strict):
    id: str = Field(pattern=NAME_PATTERN)
    path: str = "default"
    # auto: bfloat16 on GPUs, and on CPUs with native bf16 instructions (then in eager mode, the only one
    # vLLM-CPU runs bf16 correctly in); float32 on other CPUs (cluster/engine_defaults.py resolve_dtype)
    dtype: Dtype = "auto"
    max_model_len: int = Field(2048, ge=16)
    tensor_parallel_size: int = Field(1, ge=1)
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)  # passed to vLLM's AsyncEngineArgs as-is
    num_replicas: int | None = Field(None, ge=1)
    autoscaling_config: AutoscalingConfig | None = None
    max_ongoing_requests: int = Field(64, ge=1)
    # Requests each ingress replica holds for this model while every engine slot is taken; past it the
    # request is shed at once (503 with Retry-After, or the next provider) instead of queueing without end.
    # -1: no bound.
    max_queued_requests: int = Field(256, ge=-1)
    # How long a replica being removed (scale-down, redeploy) may finish the requests it has; it takes no
    # new ones meanwhile. The default covers a 4,096-token answer at ~15 tokens/s (this CPU's speed);
    # Serve's own default (20 s) cut longer streams.
    drain_timeout_s: float = Field(300.0, gt=0)
    # Serve spreads replicas over nodes by default; this caps how many may share one node.
    max_replicas_per_node: int | None = Field(None, ge=1)
    resources: Resources = Field(default_factory=Resources)
    # 0 streams every engine step as vLLM does. N > 0 coalesces the tokens of N ms into one chunk: fewer
    # events, but a percentile over events then lands inside the engine's own prefill stalls
    # (docs/benchmarks.md), and no throughput was gained on a GPU or this CPU.
    stream_interval_ms: float = Field(0.0, ge=0)
    owned_by: str = "tuneserve"
    price: Price = Field(default_factory=Price)  # what a request costs, for usage.cost and price routing
    adapters: list[AdapterConfig] = Field(default_factory=list)
    live_adapters: LiveAdapters = Field(default_factory=LiveAdapters)
    # generate: chat, completions and responses. embed: /v1/embeddings, through vLLM's pooling runner
    # (a causal LM works too: its last hidden state, pooled, is the embedding).
    task: Literal["generate", "embed"] = "generate"
    # vLLM's tool-call parser (hermes, llama3_json, mistral, ...): it reads tool calls out of the model's
    # output for tool_choice "auto". "required" and a named function are enforced by constrained decoding
    # in the parser's format, so they work with any model. None turns tool calling off for the model.
    tool_parser: str | None = "hermes"
    reasoning_parser: str | None = None
    # How requests are spread over the model's engine replicas (serve_app/replica_router.py). prefix: a
    # conversation (or an x-session-id) keeps to one replica, where vLLM's prefix cache holds its earlier
    # turns, unless that replica has more than `routing_load_gap` requests beyond the least loaded one.
    # power_of_two: Serve's default (two random replicas, the less loaded). round_robin: in turn.
    # Default: prefix when the model can have more than one replica, else Serve's default.
    routing: Literal["prefix", "power_of_two", "round_robin"] | None = None
    routing_load_gap: int = Field(8, ge=0)
    # What the folder's weights are, or what the engine does to them as it loads them
    # (serve_app/quantization.py): auto reads the folder's config.json. A method the engine's machine
    # cannot run is refused when the app is built, naming the model, the method and the machine.
    quantization: Quantization = "auto"

    @model_validator(mode="after")
    def _one_scaling_mode(self) -> "ModelConfig":
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError(f"model {self.id}: set num_replicas or autoscaling_config, not both")
        if self.task == "embed" and (self.adapters or self.reasoning_parser or self.live_adapters.enabled):
            raise ValueError(f"model {self.id}: an embedding model takes no adapters or reasoning parser")
        if "quantization" in self.engine_kwargs and self.quantization != "auto":
            raise ValueError(f"model {self.id}: set quantization or engine_kwargs.quantization, not both")
        return self

    def effective_routing(self) -> str:
        if self.routing is not None:
            return self.routing
        most = (self.autoscaling_config.max_replicas if self.autoscaling_config is not None
                else self.num_replicas or 1)
        return "prefix" if most > 1 else "power_of_two"

    def serve_scaling(self) -> dict[str, Any]:
        """The deployment options Ray Serve takes for scaling."""
        if self.autoscaling_config is not None:
            return {"autoscaling_config": self.autoscaling_config.model_dump(exclude_none=True)}
        return {"num_replicas": self.num_replicas or 1}


class ApiKey(_Strict):
    """An API key, stored hashed: `sha256` is the hex digest of the key, or `env` names a variable holding it."""

    name: str
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    env: str | None = None
    rpm: int | None = Field(None, ge=1, description="requests per minute")
    tpm: int | None = Field(None, ge=1, description="tokens (prompt + completion) per minute")
    models: list[str] | None = None  # allowed model ids or aliases; None: all
    admin: bool = False  # may manage adapters and read /admin/usage and /metrics
    # How the key shows in metric labels (Ray's metrics export, /metrics): the operator's choice of alias.
    # Default: "key-" and the first 8 hex digits of the key's digest, which name no one.
    metrics_id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

    @model_validator(mode="after")
    def _one_source(self) -> "ApiKey":
        if (self.sha256 is None) == (self.env is None):
            raise ValueError(f"api key {self.name}: set exactly one of sha256 or env")
        return self

    def digest(self) -> str:
        if self.sha256 is not None:
            return self.sha256
        value = os.environ.get(self.env or "")
        if not value:
            raise ValueError(f"api key {self.name}: environment variable {self.env} is not set")
        return hash_key(value)

    def metric_label(self) -> str:
        """How metrics name the key: its `metrics_id`, else "key-" and the first 8 hex digits of its digest."""
        return self.metrics_id or f"key-{self.digest()[:8]}"

    def resolved(self) -> "ApiKey":
        """The same key with its digest and metrics id filled in: what the ingress replicas receive, so that
        a key read from the environment is read where the app is built, and a missing one fails the build."""
        return self.model_copy(update={"sha256": self.digest(), "env": None, "metrics_id": self.metric_label()})


class ProviderModel(_Strict):
    id: str = Field(pattern=NAME_PATTERN)  # the public model id clients send
    upstream: str | None = None  # the provider's own name for it (default: id)
    price: Price = Field(default_factory=Price)
    task: Literal["generate", "embed"] = "generate"

    @property
    def upstream_name(self) -> str:
        return self.upstream or self.id


class Timeouts(_Strict):
    connect_s: float = Field(5.0, gt=0)
    read_s: float = Field(60.0, gt=0)  # until the first byte, and between streamed chunks
    total_s: float = Field(600.0, gt=0)


class RetryPolicy(_Strict):
    attempts: int = Field(2, ge=1)  # tries on one provider before falling back to the next
    backoff_s: float = Field(0.2, ge=0)  # doubled after each try, capped by max_backoff_s
    max_backoff_s: float = Field(2.0, ge=0)  # a 429 asking to wait longer moves on to the next provider


class CircuitBreaker(_Strict):
    failure_threshold: int = Field(3, ge=1)  # consecutive failures that open the circuit
    cooldown_s: float = Field(30.0, gt=0)  # then one probe request is let through


class ProviderConfig(_Strict):
    """A remote OpenAI-compatible upstream: OpenRouter, a hosted vLLM, another tuneserve."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    base_url: str = Field(pattern=r"^https?://")
    api_key_env: str | None = None  # the variable holding its key; the key itself is never logged
    models: list[ProviderModel] = Field(min_length=1)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    max_concurrency: int = Field(64, ge=1)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    circuit_breaker: CircuitBreaker = Field(default_factory=CircuitBreaker)
    # Parameters it honours, for provider.require_parameters; None: every parameter we accept.
    supported_parameters: list[str] | None = None

    @model_validator(mode="after")
    def _not_local(self) -> "ProviderConfig":
        if self.name == LOCAL_PROVIDER:
            raise ValueError(f"provider name '{LOCAL_PROVIDER}' is reserved for the local engines")
        return self


class LocalEnginePolicy(_Strict):
    """How the ingress treats its own engine deployments. A request that fails before its first byte
    (a replica that died with its node, say) is retried: Serve's handle sends the retry to a live replica.
    The breaker only trips when every replica keeps failing, and recovers quickly, because Serve itself
    replaces dead replicas."""

    retry: RetryPolicy = Field(default_factory=lambda: RetryPolicy(attempts=5, backoff_s=0.25, max_backoff_s=2.0))
    circuit_breaker: CircuitBreaker = Field(
        default_factory=lambda: CircuitBreaker(failure_threshold=50, cooldown_s=5.0))
    # An attempt whose engine yields nothing by then fails, and is retried or falls back (as a remote
    # provider's read timeout does). It covers the wait in the engine's queue and the prefill.
    attempt_timeout_s: float = Field(120.0, gt=0)


HEAD_NODE_RESOURCE = "node:__internal_head__"  # Ray's marker resource of the head node


class UsageStoreConfig(_Strict):
    """Where per-key limits, usage and cost, and open circuits are kept for every ingress replica: one Ray
    actor per app that saves the usage under the storage root (serve_app/usage_store.py says why, and what
    a crash loses)."""

    # A storage path: relative to TUNESERVE_STORAGE (the project folder on one machine), or a URI. The app's
    # name is appended. None: kept in the actor's memory only (lost when it restarts).
    path: str | None = "runs/usage"
    # When the store cannot be reached: "open" admits with each replica's own limits and keeps the usage
    # until it is back; "closed" refuses requests of keys with limits (503).
    on_unavailable: Literal["open", "closed"] = "open"
    timeout_s: float = Field(2.0, gt=0)  # one call to the store (a store being created gets a minute)
    retry_s: float = Field(5.0, gt=0)  # after a failed call, the store is tried again this much later
    flush_interval_s: float = Field(0.5, gt=0)  # replicas send usage in batches this often
    persist_interval_s: float = Field(1.0, gt=0)  # the store saves new usage this often


class IngressConfig(_Strict):
    num_replicas: int = Field(1, ge=1)
    local_engines: LocalEnginePolicy = Field(default_factory=LocalEnginePolicy)
    # "head": ingress replicas (no CPU reserved) run on the head node, so that losing a worker node never
    # takes the ingress with it: streams on that node's engine still end with an error event. "any": Serve
    # places them anywhere (more ingress capacity on large clusters, at that cost).
    placement: Literal["head", "any"] = "head"
    max_body_bytes: int = Field(1 << 20, ge=1024)
    api_keys: list[ApiKey] = Field(default_factory=list)
    max_n: int = Field(16, ge=1)
    # As ModelConfig.drain_timeout_s, for ingress replicas: every stream, local or remote, passes one.
    drain_timeout_s: float = Field(300.0, gt=0)
    # The whole time a request may take, over every candidate and retry, unless its X-Tuneserve-Timeout
    # header (seconds) sets another, up to max_request_timeout_s. Past it: a 504 before the first byte, an
    # error event after it; the provider's request is aborted either way.
    request_timeout_s: float = Field(600.0, gt=0)
    max_request_timeout_s: float = Field(3600.0, gt=0)
    # While a stream waits for its first token, an SSE comment goes out this often, so that proxies with
    # idle timeouts keep the connection. The response is then committed to 200: a failure after it is an
    # error event. 0: none (the status waits for the first token).
    sse_keepalive_s: float = Field(10.0, ge=0)
    # Requests one ingress replica serves at once; past it a request gets a 503 with Retry-After at once.
    max_ongoing_requests: int = Field(1000, ge=1)
    usage_store: UsageStoreConfig = Field(default_factory=UsageStoreConfig)
    # Without API keys the app deploys only where Serve listens on loopback alone (a laptop). true lets it
    # serve inference to anyone who reaches the port; the admin routes still refuse every caller, since
    # there is no admin key. A warning is logged at every start.
    allow_unauthenticated: bool = False

    @model_validator(mode="after")
    def _timeouts_ordered(self) -> "IngressConfig":
        if self.request_timeout_s > self.max_request_timeout_s:
            raise ValueError("ingress: request_timeout_s must be <= max_request_timeout_s")
        return self


class AdapterRegistryConfig(_Strict):
    """Where the live adapters' registry is kept: one Ray actor per app, which saves every change to
    `<path>/<app>/registry.json` before it answers (serve_app/lora_registry.py)."""

    # A storage path: relative to TUNESERVE_STORAGE, or a URI. None: the actor's memory only.
    path: str | None = "runs/adapters"


class StorageAccess(_Strict):
    """What adapters registered at runtime (`POST /v1/adapters`) may be read from. Paths written in this file
    are the operator's own choice and are not confined."""

    # Storage URIs or paths (relative ones under TUNESERVE_STORAGE). None: the storage root alone.
    allowed_roots: list[str] | None = None


class AppConfig(_Strict):
    models: list[ModelConfig] = Field(default_factory=list)  # local engines
    providers: list[ProviderConfig] = Field(default_factory=list)  # remote upstreams
    aliases: dict[str, list[str]] = Field(default_factory=dict)  # short name -> candidate model ids, in order
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    adapter_registry: AdapterRegistryConfig = Field(default_factory=AdapterRegistryConfig)
    storage: StorageAccess = Field(default_factory=StorageAccess)

    @model_validator(mode="after")
    def _consistent(self) -> "AppConfig":
        if not self.models and not self.providers:
            raise ValueError("configure at least one local model or one provider")
        ids = [model_id for model_id, _ in self.local_models()]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"model ids must be unique; repeated: {', '.join(duplicates)}")
        names = [p.name for p in self.providers]
        if len(set(names)) != len(names):
            raise ValueError("provider names must be unique")
        offered = set(self.model_ids())
        for alias, targets in self.aliases.items():
            if alias in offered:
                raise ValueError(f"alias '{alias}' hides a model of the same id")
            missing = [t for t in targets if t not in offered]
            if not targets or missing:
                raise ValueError(f"alias '{alias}' must list offered model ids; unknown: {missing}")
        return self

    def local_models(self) -> list[tuple[str, ModelConfig]]:
        """Every locally served id (models, then their adapters) with the model whose engine serves it."""
        return [(m.id, m) for m in self.models] + [(a.id, m) for m in self.models for a in m.adapters]

    def model_ids(self) -> list[str]:
        """Every public model id, local first, each once."""
        ids = [i for i, _ in self.local_models()] + [m.id for p in self.providers for m in p.models]
        return list(dict.fromkeys(ids))

    def tasks(self) -> dict[str, str]:
        """'generate' or 'embed' per public model id (the first definition wins, as in model_ids)."""
        tasks: dict[str, str] = {}
        for public_id, model in self.local_models():
            tasks.setdefault(public_id, model.task)
        for provider in self.providers:
            for model in provider.models:
                tasks.setdefault(model.id, model.task)
        return tasks


def engine_deployment_name(model_id: str) -> str:
    """The Serve deployment of a local model's engines."""
    return "Engine:" + model_id.replace("/", "--")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(text: str) -> str:
    def substitute(match: re.Match) -> str:
        name, fallback = match.group(1), match.group(2)
        value = os.environ.get(name)
        if value is None:
            if fallback is None:
                raise ValueError(f"config uses ${{{name}}} but it is not set")
            return fallback
        return value

    return _ENV_PATTERN.sub(substitute, text)


class ConfigFileError(ValueError):
    """The config file cannot be read as YAML: the message names the file, line and column."""


def load_config(path: str | Path) -> AppConfig:
    text = _expand_env(Path(path).read_text())
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context = getattr(exc, "context", None)
        raise ConfigFileError(f"{where}: invalid YAML: {problem}" + (f" ({context})" if context else "")) from None
    if data is not None and not isinstance(data, dict):
        raise ConfigFileError(f"{path}: the config must be a YAML mapping (models:, providers:, ingress:, ...)")
    return AppConfig.model_validate(data or {})


DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"
