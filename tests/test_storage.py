"""The storage URI (cluster/storage.py) against a real S3-compatible server (moto's server mode) on
127.0.0.1: reads and writes, node-local copies, and every way a URI can be wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cluster.s3_server import start_moto
from cluster.ports import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
KEYS = {"AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY": "test-secret", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server with bucket `tuneserve`; the environment points at it while the module runs."""
    port = free_port()
    log = tmp_path_factory.mktemp("s3") / "s3.log"
    process = start_moto("127.0.0.1", port, log)
    env = {**KEYS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "TUNESERVE_STORAGE": "s3://tuneserve/root"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    import pyarrow.fs as pafs

    pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key=KEYS["AWS_ACCESS_KEY_ID"],
                      secret_key=KEYS["AWS_SECRET_ACCESS_KEY"], allow_bucket_creation=True).create_dir("tuneserve")
    try:
        yield {"port": port, "env": env, "process": process, "log": log}
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        process.terminate()
        process.wait(timeout=30)


def test_relative_paths_live_under_the_storage_root(s3, tmp_path):
    from cluster import storage

    location = storage.locate("data/x.jsonl")
    assert location.uri == "s3://tuneserve/root/data/x.jsonl" and not location.is_local
    location.write_text('{"a": 1}\n')
    assert storage.locate("s3://tuneserve/root/data/x.jsonl").read_text() == '{"a": 1}\n'
    # bytes are stored as given, whatever the name says: pyarrow would (de)compress a "*.gz" by its suffix
    import gzip

    packed = gzip.compress(b"targets")
    for where in ("runs/t.json.gz", str(tmp_path / "t.json.gz")):
        storage.locate(where).write_bytes(packed)
        assert storage.locate(where).read_bytes() == packed
    # absolute paths are local files; file:// URIs too
    assert storage.locate(str(tmp_path)).is_local and storage.locate(f"file://{tmp_path}").path == str(tmp_path)
    # folders round-trip through the object store
    (tmp_path / "folder" / "sub").mkdir(parents=True)
    (tmp_path / "folder" / "a.txt").write_text("A")
    (tmp_path / "folder" / "sub" / "b.txt").write_text("B")
    storage.locate("runs/folder").upload(tmp_path / "folder")
    assert storage.locate("runs/folder").listdir() == ["a.txt", "sub"]
    back = storage.locate("runs/folder").download(tmp_path / "back")
    assert (back / "a.txt").read_text() == "A" and (back / "sub" / "b.txt").read_text() == "B"


def test_local_copy_fetches_once_under_a_lock(s3, tmp_path, monkeypatch):
    """Several replicas on one node ask at once: one download, and every caller gets the complete folder."""
    from cluster import storage

    monkeypatch.setenv("TUNESERVE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "model" / "weights.bin").write_bytes(os.urandom(1 << 20))
    storage.locate("models/m").upload(tmp_path / "model")
    downloads = []
    original = storage.Location.download

    def counting(self, local):
        downloads.append(self.uri)
        return original(self, local)

    monkeypatch.setattr(storage.Location, "download", counting)
    results = []
    threads = [threading.Thread(target=lambda: results.append(storage.local_copy("s3://tuneserve/root/models/m")))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 4 and len(set(results)) == 1
    assert downloads == ["s3://tuneserve/root/models/m"]
    assert (results[0] / "weights.bin").read_bytes() == (tmp_path / "model" / "weights.bin").read_bytes()
    assert storage.local_copy("s3://tuneserve/root/models/m") == results[0] and len(downloads) == 1
    # New bytes at the same URI (an adapter published again from a resumed run): fetched, not the old copy.
    # Same size here, so the object store's modification time tells them apart: it counts whole seconds.
    time.sleep(1.1)
    (tmp_path / "model" / "weights.bin").write_bytes(os.urandom(1 << 20))
    storage.locate("models/m").upload(tmp_path / "model")
    fresh = storage.local_copy("s3://tuneserve/root/models/m")
    assert len(downloads) == 2 and fresh != results[0]
    assert (fresh / "weights.bin").read_bytes() == (tmp_path / "model" / "weights.bin").read_bytes()


def test_a_node_fetches_a_large_file_in_few_requests(s3, tmp_path, monkeypatch):
    """Each ranged GET is a request, and moto (the S3 server of `cluster.local`) reads the whole object for
    every one: pyarrow's 1 MiB reads made a node fetch the embedded model's weights in 514 requests, minutes
    under the multi-node tests. 24 MiB now come in one."""
    from cluster import storage

    monkeypatch.setenv("TUNESERVE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "big").mkdir()
    weights = os.urandom(24 << 20)
    (tmp_path / "big" / "weights.bin").write_bytes(weights)
    storage.locate("models/big").upload(tmp_path / "big")
    fetched = storage.local_copy("s3://tuneserve/root/models/big")
    assert (fetched / "weights.bin").read_bytes() == weights
    log = s3["log"].read_text().splitlines()
    gets = [line for line in log if "GET /tuneserve/root/models/big/weights.bin " in line]  # (moto colours it)
    assert len(gets) == 1, gets


@pytest.mark.parametrize("uri, message", [
    ("ftp://host/x", "unsupported storage scheme 'ftp'"),
    ("s3:///no-bucket", "names no bucket"),
    ("s3://no-such-bucket/runs", "bucket 'no-such-bucket' does not exist"),
    ("file://relative/x", "needs an absolute path"),
])
def test_bad_uris_are_named_with_the_reason(s3, uri, message):
    from cluster import storage

    with pytest.raises(storage.StorageError, match=message) as info:
        storage.check(uri)
    assert uri.split("://")[0] in str(info.value)


def test_missing_credentials_and_a_down_server_fail_fast(s3, monkeypatch):
    from cluster import storage

    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(storage.StorageError, match="missing credentials"):
        storage.check("s3://tuneserve/root")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", KEYS["AWS_SECRET_ACCESS_KEY"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    started = time.monotonic()
    with pytest.raises(storage.StorageError, match="cannot be reached"):
        storage.check("s3://tuneserve/root")
    assert time.monotonic() - started < 30


def _finetune(overrides: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.finetune", "--config", "jobs/configs/assistant_cpu.yaml",
                           *overrides], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("change, message", [
    ({"output": "output.dir=s3://no-such-bucket/runs"}, "s3://no-such-bucket/runs/assistant-cpu: the bucket"),
    ({"env": {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}}, "cannot be reached"),
    ({"env": {"AWS_ACCESS_KEY_ID": ""}}, "missing credentials"),
    ({"output": "data.train=[data/not-there.jsonl]"}, "data/not-there.jsonl: data file not found"),
])
def test_finetune_with_bad_storage_fails_before_any_worker(s3, change, message):
    """Exit 2 with the URI and the reason, and no Ray started: `--dry-run` is not needed to see it."""
    storage_env = {**s3["env"], **change.get("env", {})}
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | storage_env
    env["TUNESERVE_RAY_DIR"] = "/nonexistent-ray-dir"  # a job that reached Ray would have to start one
    overrides = [change["output"]] if "output" in change else []
    result = _finetune(overrides, env)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr, result.stderr[-2000:]
    assert "Started a local Ray instance" not in result.stderr and "TrainController" not in result.stderr


def test_storage_cli_put_ls_get(s3, tmp_path):
    env = {**os.environ, **s3["env"]}
    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": []}) + "\n")
    run = lambda *args: subprocess.run([sys.executable, "-m", "cluster.storage", *args], env=env,  # noqa: E731
                                       capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    put = run("put", str(tmp_path / "d.jsonl"), "data/d.jsonl")
    assert put.returncode == 0 and "s3://tuneserve/root/data/d.jsonl" in put.stdout, put.stderr
    assert "d.jsonl" in run("ls", "data").stdout.split()
    got = run("get", "data/d.jsonl", str(tmp_path / "back.jsonl"))
    assert got.returncode == 0 and (tmp_path / "back.jsonl").read_text() == (tmp_path / "d.jsonl").read_text()
    missing = run("get", "data/none.jsonl", str(tmp_path / "x"))
    assert missing.returncode == 2 and "s3://tuneserve/root/data/none.jsonl: not found" in missing.stderr


def test_caller_paths_stay_under_the_storage_root_in_an_object_store(s3):
    """What `POST /v1/adapters` may name on a cluster: only objects under the storage root's prefix, in its
    bucket; one answer for missing and not allowed."""
    from cluster import storage

    storage.locate("runs/a/adapter/adapter_config.json").write_text("{}")
    storage.locate("s3://tuneserve/rootx/adapter/adapter_config.json").write_text("{}")  # a look-alike prefix
    storage.locate("s3://tuneserve/other/adapter/adapter_config.json").write_text("{}")
    assert storage.confined("runs/a/adapter").uri == "s3://tuneserve/root/runs/a/adapter"
    assert storage.confined("s3://tuneserve/root/runs/a/adapter").uri == "s3://tuneserve/root/runs/a/adapter"
    for path in ("s3://tuneserve/rootx/adapter", "s3://tuneserve/other/adapter", "s3://tuneserve/root/../other/adapter",
                 "runs/../../other/adapter", "s3://elsewhere/root/runs/a/adapter", "runs/gone", "file:///etc", "/etc"):
        with pytest.raises(storage.NotAllowed, match="not found, or outside the storage this service may read"):
            storage.confined(path)
    assert storage.confined("s3://tuneserve/other/adapter", ["s3://tuneserve/other"]).uri == "s3://tuneserve/other/adapter"
