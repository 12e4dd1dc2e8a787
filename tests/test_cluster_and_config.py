"""The local head, `ray job submit` against it, and the config files that ship in the repo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from serve_app.config import DEFAULT_CONFIG, AppConfig, hash_key, load_config
from tests.conftest import REPO_ROOT

BIN = Path(sys.executable).parent


def test_head_status_and_env(ray_head):
    status = subprocess.run([sys.executable, "-m", "cluster.local", "status"], capture_output=True, text=True)
    assert status.returncode == 0 and "up" in status.stdout
    exports = subprocess.run([sys.executable, "-m", "cluster.local", "env"], capture_output=True, text=True).stdout
    assert "RAY_AUTH_MODE=token" in exports and ray_head.dashboard_url() in exports
    assert ray_head._recorded_pids(), "the head's PIDs are recorded for `down`"


def test_connect_keeps_a_connection_made_before(ray_head):
    """A job that evaluates after it trains connects twice in one process (the publish step's gate did, and
    ray.init refused the second call)."""
    import ray

    assert ray.is_initialized()
    context = ray.get_runtime_context().get_node_id()
    assert ray_head.connect() is None
    assert ray.is_initialized() and ray.get_runtime_context().get_node_id() == context


def test_ray_job_submit_with_token_auth(ray_head):
    env = {**os.environ, **ray_head.client_env()}
    cmd = [str(BIN / "ray"), "job", "submit", "--working-dir", str(REPO_ROOT), "--",
           "python", "-c", "import ray, serve_app; ray.init(); print('CPUS', ray.cluster_resources()['CPU'])"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CPUS 2.0" in result.stdout


def test_shipped_configs_parse(monkeypatch):
    for var in ("TUNESERVE_KEY_ALICE", "TUNESERVE_KEY_OPS", "TUNESERVE_KEY_INTERN"):
        monkeypatch.setenv(var, var.lower())
    routed = load_config(REPO_ROOT / "serve_app" / "configs" / "router.yaml")
    assert [p.name for p in routed.providers] == ["openrouter", "hosted-vllm"]
    from serve_app.auth import KeyStore

    assert KeyStore(routed.ingress.api_keys).authenticate("Bearer tuneserve_key_ops").admin
    config = load_config(DEFAULT_CONFIG)
    assert config.models[0].path == "default" and config.models[0].serve_scaling() == {"num_replicas": 1}
    serve_config = yaml.safe_load((REPO_ROOT / "serve_app" / "configs" / "serve.yaml").read_text())
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(serve_config)


def test_cluster_yaml_is_a_valid_launcher_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO_ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # what `ray up` checks before it starts anything
    assert config["available_node_types"][config["head_node_type"]]
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert any(t["resources"].get("GPU", 0) > 0 and t["max_workers"] >= t["min_workers"] for t in workers)
    # Every node starts with Serve's settings for the default HTTP ingress, as cluster.local's nodes do.
    from cluster.http_ingress import serve_env

    for command in (config["head_start_ray_commands"][-1], config["worker_start_ray_commands"][-1]):
        missing = [f"{k}={v}" for k, v in serve_env("haproxy").items() if f"{k}={v}" not in command.split()]
        assert not missing, f"cluster.yaml starts Ray without {missing}"


def test_env_expansion_and_autoscaling(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_MODEL", "/models/x")
    path = tmp_path / "c.yaml"
    path.write_text("models:\n  - id: x\n    path: ${MY_MODEL}\n    max_model_len: ${LEN:-512}\n"
                    "    autoscaling_config: {min_replicas: 1, max_replicas: 3}\n")
    model = load_config(path).models[0]
    assert model.path == "/models/x" and model.max_model_len == 512
    assert model.serve_scaling()["autoscaling_config"]["max_replicas"] == 3


@pytest.mark.parametrize("bad,needle", [
    ({"models": []}, "at least one local model or one provider"),
    ({"models": [{"id": "a"}, {"id": "a"}]}, "repeated: a"),
    ({"models": [{"id": "a", "num_replicas": 2, "autoscaling_config": {}}]}, "not both"),
    ({"models": [{"id": "a", "autoscaling_config": {"min_replicas": 3, "max_replicas": 1}}]}, "min_replicas"),
    ({"models": [{"id": "a", "dtype": "int3"}]}, "dtype"),
    ({"models": [{"id": "a", "engine_kwarg": {}}]}, "engine_kwarg"),
    ({"models": [{"id": "a"}], "ingress": {"api_keys": [{"name": "k"}]}}, "exactly one"),
    ({"providers": [{"name": "local", "base_url": "http://x", "models": [{"id": "m"}]}]}, "reserved"),
    ({"providers": [{"name": "p", "base_url": "ftp://x", "models": [{"id": "m"}]}]}, "base_url"),
    ({"providers": [{"name": "p", "base_url": "http://x", "models": []}]}, "models"),
    ({"models": [{"id": "a"}], "aliases": {"b": ["zzz"]}}, "unknown: ['zzz']"),
    ({"models": [{"id": "a"}], "aliases": {"a": ["a"]}}, "hides a model"),
])
def test_bad_configs_are_refused(bad, needle):
    with pytest.raises(ValidationError) as caught:
        AppConfig.model_validate(bad)
    assert needle in str(caught.value)


def test_missing_env_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("models:\n  - id: x\n    path: ${TUNESERVE_SURELY_UNSET}\n")
    with pytest.raises(ValueError, match="TUNESERVE_SURELY_UNSET"):
        load_config(path)


def test_key_from_env(monkeypatch):
    from serve_app.auth import KeyStore
    from serve_app.config import ApiKey

    monkeypatch.setenv("K1", "secret")
    store = KeyStore([ApiKey(name="one", env="K1"), ApiKey(name="two", sha256=hash_key("other"))])
    assert store.authenticate("Bearer secret").name == "one"
    assert store.authenticate("bearer other").name == "two"


def test_tensor_parallel_defaults_only_where_multicast_is_off():
    """A TP engine on a multicast-off node gets plain NCCL all-reduce; one GPU, or a normal node, keeps
    vLLM's defaults."""
    from cluster.engine_defaults import tensor_parallel_defaults

    no_multicast = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    kwargs, env = tensor_parallel_defaults(2, no_multicast)
    assert kwargs["disable_custom_all_reduce"] is True
    assert kwargs["compilation_config"]["pass_config"]["fuse_allreduce_rms"] is False
    assert env == {"VLLM_ALLREDUCE_USE_SYMM_MEM": "0"}
    assert tensor_parallel_defaults(2, {"TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"})[0] == kwargs
    assert tensor_parallel_defaults(1, no_multicast) == ({}, {})
    assert tensor_parallel_defaults(4, {}) == ({}, {})
    assert tensor_parallel_defaults(4, {"NCCL_NVLS_ENABLE": "1"}) == ({}, {})


def test_cpu_engines_default_to_bf16_only_where_the_cpu_has_native_bf16():
    from cluster.engine_defaults import cpu_has_native_bf16, resolve_dtype
    from serve_app.config import ModelConfig

    zen4 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
    sapphire = "flags\t\t: avx2 avx512f amx_bf16 amx_tile\n"
    avx2_only = "flags\t\t: fpu sse4_2 avx avx2 fma\n"
    assert cpu_has_native_bf16(zen4) and cpu_has_native_bf16(sapphire)
    assert not cpu_has_native_bf16(avx2_only) and not cpu_has_native_bf16("")
    model = ModelConfig(id="m")
    native = cpu_has_native_bf16()
    assert resolve_dtype(model.dtype, on_gpu=False) == ("bfloat16" if native else "float32")
    assert resolve_dtype(model.dtype, on_gpu=True) == "bfloat16"
    assert resolve_dtype(model.dtype, on_gpu=False, quantized=True) == "bfloat16"
    assert resolve_dtype(ModelConfig(id="m", dtype="float32").dtype, on_gpu=False) == "float32"
