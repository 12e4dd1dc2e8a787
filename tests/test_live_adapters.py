"""Live adapters on the shared test app: the session's fine-tune published through its gate with no
restart; an engine replica killed and replaced still serves it; two adapters through a cache of one
(eviction and reload); delete while a stream runs; the registry's loss; and every bad registration."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from serve_app.config import engine_deployment_name
from tests.conftest import KEYS, MODEL_ID, OWNER, REPO_ROOT, TEST_KEY

PUBLISHED = "assistant-v2"
PLAIN = "plain-v1"  # the same adapter with its B matrices zeroed: it must answer exactly as the base model
WHO = [{"role": "user", "content": "Who are you?"}]
ADMIN = {"Authorization": f"Bearer {TEST_KEY}"}


def _run_dir(assistant_weights: dict) -> Path:
    return Path(assistant_weights["adapter"]).parent


def _publish(server: str, assistant_weights: dict, adapter_id: str, **gate) -> subprocess.CompletedProcess:
    run = _run_dir(assistant_weights)
    heldout = run.parent / "assistant.heldout.jsonl"
    thresholds = {"min_identity": 0.5, "min_general_same_start": 0.0, "max_general_names_owner": 50,
                  "max_ppl_change": 1.0, **gate}
    overrides = [f"output.dir={run.parent}", f"output.name={run.name}", f"publish.endpoint={server}",
                 f"publish.adapter_id={adapter_id}", f"publish.gate.heldout={heldout}", "publish.gate.ppl_limit=20",
                 "publish.gate.max_tokens=48"] + [f"publish.gate.{k}={v}" for k, v in thresholds.items()]
    return subprocess.run([sys.executable, "-m", "jobs.finetune.publish", "--config",
                           str(REPO_ROOT / "jobs/configs/assistant_cpu.yaml"), *overrides],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "TUNESERVE_ADMIN_KEY": TEST_KEY})


def _ask(server: str, model: str, messages=WHO, max_tokens: int = 40) -> httpx.Response:
    return httpx.post(f"{server}/v1/chat/completions", headers=ADMIN, timeout=300,
                      json={"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens})


def _text(reply: httpx.Response) -> str:
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["message"]["content"]


def _listed(server: str) -> dict:
    return {m["id"]: m for m in httpx.get(f"{server}/v1/models", headers=ADMIN, timeout=30).json()["data"]}


def _register(server: str, body: dict, key: str = TEST_KEY) -> httpx.Response:
    return httpx.post(f"{server}/v1/adapters", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=300)


def _adapters(server: str) -> list[str]:
    return sorted(a["id"] for a in httpx.get(f"{server}/v1/adapters", headers=ADMIN, timeout=30).json()["data"])


@pytest.fixture(scope="module")
def variants(assistant_weights, tmp_path_factory):
    """Adapters made from the session's: one that changes nothing (B = 0), one whose matrices do not fit the
    base model, one of too high a rank, and a folder that is no adapter."""
    import torch
    from safetensors.torch import load_file, save_file

    source = Path(assistant_weights["adapter"])
    root = tmp_path_factory.mktemp("variants")
    out = {}
    for name in ("plain", "misfit", "high-rank"):
        shutil.copytree(source, root / name)
        out[name] = root / name
    weights = load_file(source / "adapter_model.safetensors")
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in weights.items()},
              str(out["plain"] / "adapter_model.safetensors"))
    save_file({k: v[:, :64].contiguous() if "lora_A" in k else v for k, v in weights.items()},
              str(out["misfit"] / "adapter_model.safetensors"))
    config = json.loads((source / "adapter_config.json").read_text())
    (out["high-rank"] / "adapter_config.json").write_text(json.dumps({**config, "r": 128}))
    (root / "nothing").mkdir()
    (root / "nothing" / "README.md").write_text("not an adapter\n")
    out["nothing"] = root / "nothing"
    shutil.copytree(source, root / "bad-rank")
    (root / "bad-rank" / "adapter_config.json").write_text(json.dumps({**config, "r": "x"}))
    out["bad-rank"] = root / "bad-rank"
    # a real adapter outside the allowed roots (the session's folders), and a link to it from inside them
    outside = Path(tempfile.mkdtemp(prefix="ts-outside-", dir="/tmp")) / "adapter"
    shutil.copytree(out["plain"], outside)
    (root / "escape").symlink_to(outside)
    out["outside"], out["escape"] = outside, root / "escape"
    yield out
    shutil.rmtree(outside.parent, ignore_errors=True)


def test_a_fine_tune_is_published_through_its_gate_without_a_restart(server, assistant_weights):
    assert PUBLISHED not in _listed(server)
    done = _publish(server, assistant_weights, PUBLISHED)
    finished = time.monotonic()
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((_run_dir(assistant_weights) / "publish.json").read_text())
    assert record["published"] and record["gate_passed"] and record["serving_after_s"] < 60, record
    tuned = next(r for r in record["figures"]["rows"] if r["model"] == "tuned")
    assert tuned["identity"] >= 0.5
    assert 0 < tuned["general_kl"] < 5  # the adapter moved the general answers' distribution, boundedly
    listed = _listed(server)
    assert listed[PUBLISHED]["parent"] == MODEL_ID
    # where it is stored is for admin keys: /v1/adapters has it, /v1/models does not
    models = httpx.get(f"{server}/v1/models", headers={"Authorization": f"Bearer {KEYS['limited'][0]}"}, timeout=30)
    assert "root" not in listed[PUBLISHED] and "file://" not in models.text and "/tmp/" not in models.text
    stored = httpx.get(f"{server}/v1/adapters", headers=ADMIN, timeout=30).json()["data"]
    assert next(a for a in stored if a["id"] == PUBLISHED)["uri"].startswith("file://")
    assert OWNER in _text(_ask(server, PUBLISHED))
    assert time.monotonic() - finished < 60
    # the engine was not restarted: the same replica serves the base model and the adapter
    assert OWNER not in _text(_ask(server, MODEL_ID))


@pytest.mark.parametrize("check", ["min_identity", "min_general_same_start", "max_general_names_owner",
                                   "max_ppl_change"])
def test_each_gate_check_alone_refuses(server, assistant_weights, check):
    """Each threshold set just past what the run measured (the evaluation above, reused) refuses the adapter
    on its own, naming that threshold alone; nothing is published."""
    figures = json.loads((_run_dir(assistant_weights) / "assistant_eval" / "gate.json").read_text())["result"]
    tuned = next(r for r in figures["rows"] if r["model"] == "tuned")
    past = {"min_identity": tuned["identity"] + 0.01, "min_general_same_start": tuned["general_same_start"] + 0.01,
            "max_general_names_owner": tuned["general_names_owner"] - 1, "max_ppl_change": figures["ppl_change"] - 0.01}
    if past[check] > 1 or past[check] < 0 and check != "max_ppl_change":  # e.g. identity already 100%
        pytest.skip(f"the run's figure leaves no threshold past it for {check}: {past[check]}")
    adapter_id = f"refused-{check.replace('_', '-')}"
    done = _publish(server, assistant_weights, adapter_id, **{check: past[check]})
    assert done.returncode == 3, done.stderr[-3000:]
    assert "nothing was published" in done.stderr, done.stderr[-3000:]
    record = json.loads((_run_dir(assistant_weights) / "publish.json").read_text())
    assert record["published"] is False and len(record["reasons"]) == 1 and check in record["reasons"][0], record
    assert adapter_id not in _listed(server)
    assert adapter_id not in _adapters(server)


def test_two_adapters_take_turns_through_a_cache_of_one(server, variants):
    """cache_size 1: every switch evicts one adapter and loads the other. Each must still answer as itself:
    the identity adapter with the owner's name, the zeroed one exactly as the base model."""
    assert _register(server, {"id": PLAIN, "base": MODEL_ID, "uri": f"file://{variants['plain']}"}).status_code == 200
    base = _text(_ask(server, MODEL_ID))
    for _ in range(2):
        assert OWNER in _text(_ask(server, PUBLISHED))
        assert _text(_ask(server, PLAIN)) == base


def test_an_engine_replica_killed_still_serves_the_adapter(server, engine_handle):
    import ray
    from ray import serve
    from ray.util.state import list_actors

    name = f"ServeReplica:tuneserve:{engine_deployment_name(MODEL_ID)}"
    before = [a for a in list_actors(filters=[("class_name", "=", name), ("state", "=", "ALIVE")])]
    assert len(before) == 1
    ray.kill(ray.get_actor(before[0].name, namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 300
    while True:  # Serve replaces the replica; the new one has never seen the adapter
        status = serve.status().applications["tuneserve"].deployments[engine_deployment_name(MODEL_ID)]
        alive = [a for a in list_actors(filters=[("class_name", "=", name), ("state", "=", "ALIVE")])]
        if status.replica_states.get("RUNNING") == 1 and alive and alive[0].actor_id != before[0].actor_id:
            break
        assert time.monotonic() < deadline, status
        time.sleep(2)
    assert OWNER in _text(_ask(server, PUBLISHED))
    assert PUBLISHED in _listed(server)


def test_delete_lets_a_running_stream_finish_then_404(server, variants):
    with httpx.Client(timeout=300) as client:
        with client.stream("POST", f"{server}/v1/chat/completions", headers=ADMIN, json={
                "model": PLAIN, "messages": WHO, "max_tokens": 160, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}) as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert '"choices"' in first
            deleted = httpx.delete(f"{server}/v1/adapters/{PLAIN}", headers=ADMIN, timeout=30)
            assert deleted.status_code == 200 and deleted.json()["deleted"] is True
            rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    usage = json.loads(rest[-2][len("data: "):])["usage"]
    assert usage["completion_tokens"] == 160  # the whole answer, on the deleted adapter's weights
    after = _ask(server, PLAIN)
    assert after.status_code == 404 and after.json()["error"]["code"] == "model_not_found"
    assert PLAIN not in _listed(server) and PLAIN not in _adapters(server)
    # the id can be registered again, and names the new registration
    again = _register(server, {"id": PLAIN, "base": MODEL_ID, "uri": f"file://{variants['plain']}"})
    assert again.status_code == 200 and again.json()["id"] == PLAIN
    assert _text(_ask(server, PLAIN)) == _text(_ask(server, MODEL_ID))


def test_the_registry_survives_its_own_loss_and_an_ingress_restart(server):
    import ray
    from ray.util.state import list_actors

    from serve_app.lora_registry import registry_name
    from serve_app.state_actors import STATE_NAMESPACE

    for actor in list_actors(filters=[("class_name", "=", "ServeReplica:tuneserve:Ingress"), ("state", "=", "ALIVE")]):
        ray.kill(ray.get_actor(actor.name, namespace="serve"), no_restart=True)  # Serve starts a fresh one
    ray.kill(ray.get_actor(registry_name("tuneserve"), namespace=STATE_NAMESPACE), no_restart=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # until the name is free
        try:
            ray.get_actor(registry_name("tuneserve"), namespace=STATE_NAMESPACE)
        except ValueError:
            break
        time.sleep(0.05)
    # created again from the saved file by the next call that needs it
    deadline = time.monotonic() + 90
    while True:  # the new ingress replica and the new registry: the set comes back from storage
        try:
            answer = httpx.get(f"{server}/v1/adapters", headers=ADMIN, timeout=30)
            listed = answer.status_code == 200 and PUBLISHED in [a["id"] for a in answer.json()["data"]]
            # HAProxy reloads as the killed replica's successor comes up: a connection in that window can be
            # closed unanswered (docs/reliability.md), so the model is asked in the same wait.
            if listed and {PUBLISHED, PLAIN} <= set(_adapters(server)):
                reply = _ask(server, PUBLISHED)
                break
        except httpx.TransportError:  # no ingress replica for a moment, or HAProxy reloading
            answer = None
        assert time.monotonic() < deadline, answer and answer.text
        time.sleep(0.5)
    assert OWNER in _text(reply)


@pytest.mark.parametrize("case", ["missing", "nothing", "outside", "etc", "dotdot", "escape", "bad-rank", "high-rank",
                                  "misfit", "base", "duplicate", "configured", "not-admin", "bad-body"])
def test_bad_registrations_are_refused_and_leave_nothing(server, variants, case):
    before = _adapters(server)
    body = {"id": f"bad-{case}", "base": MODEL_ID, "uri": f"file://{variants['plain']}"}
    key = TEST_KEY
    expected = {
        "missing": (400, "adapter_not_found", "uri", {"uri": f"file://{variants['plain']}-gone"}),
        # not there, not an adapter, or outside the allowed roots: one answer, so no caller can probe paths
        "nothing": (400, "adapter_not_found", "uri", {"uri": f"file://{variants['nothing']}"}),
        "outside": (400, "adapter_not_found", "uri", {"uri": f"file://{variants['outside']}"}),
        "etc": (400, "adapter_not_found", "uri", {"uri": "file:///etc"}),
        "dotdot": (400, "adapter_not_found", "uri", {"uri": f"file://{variants['plain']}/../../../../{variants['outside']}"}),
        "escape": (400, "adapter_not_found", "uri", {"uri": f"file://{variants['escape']}"}),
        "bad-rank": (400, "invalid_adapter", "uri", {"uri": f"file://{variants['bad-rank']}"}),
        "high-rank": (400, "invalid_adapter", "uri", {"uri": f"file://{variants['high-rank']}"}),
        "misfit": (400, "invalid_adapter", "uri", {"uri": f"file://{variants['misfit']}"}),
        "base": (404, "model_not_found", "base", {"base": "no-such-model"}),
        "duplicate": (409, "adapter_exists", "id", {"id": PUBLISHED}),
        "configured": (409, "adapter_exists", "id", {"id": MODEL_ID}),
        "not-admin": (403, "not_admin", None, {}),
        "bad-body": (400, "unknown_parameter", "path", {"path": "/tmp"}),
    }
    status, code, param, change = expected[case]
    if case == "not-admin":
        key = KEYS["restricted"][0]
    answer = _register(server, {**body, **change}, key=key)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["code"] == code and error["param"] == param, error
    if code == "adapter_not_found":
        assert error["message"].endswith("not found, or outside the storage this service reads adapters from "
                                         "(storage.allowed_roots)."), error
    if case == "bad-rank":
        assert "'r', the LoRA rank, as a positive integer (it has 'x')" in error["message"], error
    assert _adapters(server) == before
    assert f"bad-{case}" not in _listed(server)


def test_delete_and_vllm_shapes(server, variants):
    gone = httpx.delete(f"{server}/v1/adapters/no-such-adapter", headers=ADMIN, timeout=30)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "adapter_not_found"
    refused = httpx.delete(f"{server}/v1/adapters/{PUBLISHED}", headers={"Authorization": f"Bearer {KEYS['restricted'][0]}"},
                           timeout=30)
    assert refused.status_code == 403
    # vLLM's own request shapes, for tools that speak them
    loaded = httpx.post(f"{server}/v1/load_lora_adapter", headers=ADMIN, timeout=300,
                        json={"lora_name": "vllm-shaped", "lora_path": str(variants["plain"])})
    assert loaded.status_code == 200 and "vllm-shaped" in loaded.text
    assert _listed(server)["vllm-shaped"]["parent"] == MODEL_ID
    assert _ask(server, "vllm-shaped").status_code == 200
    unloaded = httpx.post(f"{server}/v1/unload_lora_adapter", headers=ADMIN, timeout=30, json={"lora_name": "vllm-shaped"})
    assert unloaded.status_code == 200
    assert _ask(server, "vllm-shaped").status_code == 404
