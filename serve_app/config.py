"""The one typed config file that drives `serve run` / `serve deploy`, the demo and the tests.

    models:
      - id: smollm2-135m-instruct
        path: default            # or any Hugging Face folder / hub id
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


class ModelConfig(_Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    path: str = "default"
    dtype: Dtype = "auto"  # auto: float32 on CPU (bf16 is slow and needs eager mode there), bfloat16 on GPU
    max_model_len: int = Field(2048, ge=16)
    tensor_parallel_size: int = Field(1, ge=1)
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)  # passed to vLLM's AsyncEngineArgs as-is
    num_replicas: int | None = Field(None, ge=1)
    autoscaling_config: AutoscalingConfig | None = None
    max_ongoing_requests: int = Field(64, ge=1)
    resources: Resources = Field(default_factory=Resources)
    # Engine steps are coalesced into one streamed chunk per interval: per-token Ray streaming
    # costs more than it carries. 0 sends every step.
    stream_interval_ms: float = Field(15.0, ge=0)
    owned_by: str = "tuneserve"

    @model_validator(mode="after")
    def _one_scaling_mode(self) -> "ModelConfig":
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError(f"model {self.id}: set num_replicas or autoscaling_config, not both")
        return self

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


class IngressConfig(_Strict):
    num_replicas: int = Field(1, ge=1)
    max_body_bytes: int = Field(1 << 20, ge=1024)
    api_keys: list[ApiKey] = Field(default_factory=list)
    max_n: int = Field(16, ge=1)


class AppConfig(_Strict):
    models: list[ModelConfig] = Field(min_length=1)
    ingress: IngressConfig = Field(default_factory=IngressConfig)

    @model_validator(mode="after")
    def _unique_ids(self) -> "AppConfig":
        ids = [m.id for m in self.models]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"model ids must be unique; repeated: {', '.join(duplicates)}")
        return self


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


def load_config(path: str | Path) -> AppConfig:
    text = _expand_env(Path(path).read_text())
    return AppConfig.model_validate(yaml.safe_load(text) or {})


DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"
